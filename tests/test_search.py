"""Step-level search with the built-in SPRM: beam search and DVTS over steps, row removal, the search tree.

Best-of-N itself is covered in ``test_generation_metastone.py``; the helpers come from there.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from conftest import STEP
from reference import reference_majority
from test_generation_metastone import (
    EOS,
    PAD,
    PROMPTS,
    STEPPY,
    DigitTokenizer,
    assert_online_equals_offline,
    digit_answers,
)
from test_remote_code import CLEAN_LOADER, REMOTE_CODE_SET, run_without_package

from metastone_hf import SearchConfig, SearchOutput, search_generate
from metastone_hf.generation_metastone import default_beam_width
from metastone_hf.tiny import tiny_metastone

# Steps and EOS both frequent: several rounds, and trajectories finishing at different depths.
SEARCHY = {"sequence_bias": {(STEP,): 1.5, (EOS,): 1.0}, "eos_token_id": EOS, "pad_token_id": PAD}


@pytest.fixture(scope="module")
def model():
    return tiny_metastone(seed=31)


def run(model, search, **options):
    ids, mask = PROMPTS
    settings = {"num_candidates": 8, "beam_width": 2, "seed": 1, "max_new_tokens": 30, "progress_bar": False}
    settings.update(options)
    return model.generate(ids, attention_mask=mask, search=search, **{**SEARCHY, **settings})


def children(tree, node_id):
    return [n for n in tree if n.parent == node_id]


# ----------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("search", ["beam", "dvts"])
@pytest.mark.parametrize("ranking", ["mean", "last"])
def test_online_step_scores_equal_score_trajectories(model, search, ranking):
    for seed in (1, 2, 3):
        out = run(model, search, ranking=ranking, seed=seed)
        assert isinstance(out, SearchOutput) and out.search == search
        assert out.candidates.shape[:2] == (2, 8)
        assert max(len(set(n.round for n in tree)) for tree in out.search_tree) > 2  # several rounds really ran
        assert_online_equals_offline(model, out)


@pytest.mark.parametrize("search", ["beam", "dvts"])
def test_a_search_whose_first_expansion_reaches_eos_is_best_of_n(model, search):
    # No step token can be sampled: every child of the first expansion runs to EOS or the limit, like Best-of-N's.
    settings = {"suppress_tokens": [STEP], "sequence_bias": {(EOS,): 1.5}, "max_new_tokens": 20}
    best_of_n = run(model, "best_of_n", beam_width=None, **settings)
    searched = run(model, search, **settings)
    assert torch.equal(searched.candidates, best_of_n.candidates)
    assert torch.equal(searched.scores, best_of_n.scores) and torch.equal(searched.chosen_index, best_of_n.chosen_index)
    assert all(max(n.round for n in tree) == 1 for tree in searched.search_tree)


def test_token_accounting_nothing_is_processed_twice(model):
    ids, _ = PROMPTS
    for search in ("beam", "dvts", "best_of_n"):
        fed: list[torch.Size] = []
        handle = model.model.embed_tokens.register_forward_hook(
            lambda _m, inputs, _o, fed=fed: fed.append(inputs[0].shape)
        )
        try:
            out = run(model, search, beam_width=None if search == "best_of_n" else 2)
        finally:
            handle.remove()
        batch, width = ids.shape
        assert fed[0] == (batch, width - 1)  # the prompts, once
        assert all(shape[1] == 1 for shape in fed[1:])  # afterwards one new token per row and forward
        processed = sum(shape[0] * shape[1] for shape in fed)
        assert processed == out.tokens_processed
        nodes = [n for tree in out.search_tree for n in tree if n.parent is not None]
        leaves = [n for tree in out.search_tree for n in tree if n.parent is not None and not children(tree, n.id)]
        # Every sampled token is in exactly one segment of the tree ...
        assert out.tokens_generated == sum(n.end - n.start for n in nodes)
        # ... and is fed exactly once, except the last token of each branch that ended (never needed).
        assert processed == batch * (width - 1) + batch + out.tokens_generated - len(leaves)


# ----------------------------------------------------------------------------------- the strategies' semantics


FINISHED = ("completed", "surplus", "pruned")


def assert_search_and_learn_beam_tree(tree, n: int, m: int, ranking: str) -> int:
    """The tree of search-and-learn's beam search with N = ``n``, M = ``m``; returns the rounds with N/M survivors.

    Every round has N rows; once the rows that finished are set aside, the N/M best of those that reached a step
    survive (none once the prompt has N finished candidates), and the survivors share the next N children evenly,
    the better-ranked first: M each when N/M survived.
    """
    full_rounds = 0
    rounds = sorted({node.round for node in tree if node.round > 0})
    for r in rounds:
        this_round = [node for node in tree if node.round == r]
        assert len(this_round) == n  # N rows every round
        at_step = [node for node in this_round if node.status in ("expanded", "dropped")]
        assert all(node.status in FINISHED for node in this_round if node not in at_step)
        finished_so_far = sum(1 for node in tree if 0 < node.round <= r and node.status in FINISHED)
        kept = [node for node in at_step if node.status == "expanded"]
        expected = 0 if finished_so_far >= n else min(n // m, len(at_step))
        assert len(kept) == expected, (r, len(kept), expected)
        dropped = [node for node in at_step if node.status == "dropped"]
        if ranking == "last" and kept and dropped:
            assert min(node.step_score for node in kept) >= max(node.step_score for node in dropped)
        if not kept:
            assert r == rounds[-1]
            continue
        fanout = sorted((len(children(tree, node.id)) for node in kept), reverse=True)
        base = n // len(kept)
        assert sum(fanout) == n and set(fanout) <= {base, base + 1}
        if len(kept) == n // m:
            assert fanout == [m] * len(kept)
            full_rounds += 1
        next_round = [node for node in tree if node.round == r + 1]
        assert {node.parent for node in next_round} == {node.id for node in kept}
    return full_rounds


@pytest.mark.parametrize("ranking", ["mean", "last"])
@pytest.mark.parametrize(("n", "m"), [(8, 2), (8, 4), (8, 1), (8, 8), (6, 3)])
def test_beam_search_keeps_n_over_m_beams_of_m_children_as_search_and_learn(model, n, m, ranking):
    full_rounds = 0
    for seed in (1, 2):
        out = run(model, "beam", ranking=ranking, num_candidates=n, beam_width=m, seed=seed)
        for tree in out.search_tree:
            full_rounds += assert_search_and_learn_beam_tree(tree, n, m, ranking)
    if m > 1:  # (M = 1 keeps every beam that reached a step: a full round needs one where none finished)
        assert full_rounds >= 2  # rounds where N/M beams survived and each had M children did run


def test_default_beam_width_keeps_the_tree_of_n_over_4_beams_of_4_children(model):
    # Before beam_width took search-and-learn's meaning, the default kept max(1, N // 4) beams of N / that children
    # and gave DVTS max(1, N // 4) children per subtree, where that divided N (else it was refused).
    for n in range(1, 65):
        beam, dvts = default_beam_width("beam", n), default_beam_width("dvts", n)
        assert n % beam == 0 and n % dvts == 0
        if n % max(1, n // 4) == 0:
            assert n // beam == max(1, n // 4) and dvts == max(1, n // 4)
    assert [default_beam_width("beam", n) for n in (2, 8, 32)] == [2, 4, 4]
    assert [default_beam_width("dvts", n) for n in (2, 8, 32)] == [1, 2, 8]
    out = run(model, "beam", beam_width=None, num_candidates=8)
    assert sum(assert_search_and_learn_beam_tree(tree, 8, 4, "mean") for tree in out.search_tree) >= 1
    explicit = run(model, "beam", beam_width=4, num_candidates=8)
    assert torch.equal(out.candidates, explicit.candidates)


# the returned candidates are the completed leaves, in the order they finished (round by round)
def test_searched_candidates_are_the_completed_leaves_in_finishing_order(model):
    for search in ("beam", "dvts"):
        out = run(model, search)
        for row, tree in zip(out.candidate_nodes.tolist(), out.search_tree):
            assert {tree[i].status for i in row} == {"completed"}
            assert sorted(row) == sorted(n.id for n in tree if n.status == "completed")
            assert [tree[i].round for i in row] == sorted(tree[i].round for i in row)


def test_dvts_subtrees_are_independent_and_greedy(model):
    out = run(model, "dvts", num_candidates=8, beam_width=4)  # 2 subtrees, each expanded 4 ways
    for tree in out.search_tree:
        for node in tree:
            if node.parent is not None and tree[node.parent].parent is not None:
                assert node.group == tree[node.parent].group  # children stay in their subtree
        for r in sorted({n.round for n in tree if n.round > 0}):
            for group in (0, 1):
                kept = [n for n in tree if n.round == r and n.group == group and n.status == "expanded"]
                assert len(kept) <= 1  # greedy: one beam per subtree continues
                for node in kept:
                    assert len(children(tree, node.id)) == 4
    first_round = [n for n in out.search_tree[0] if n.round == 1]
    assert sorted(n.group for n in first_round) == [0] * 4 + [1] * 4


def test_voting_works_on_searched_candidates(model):
    out = run(model, "beam", selection="majority", tokenizer=DigitTokenizer())
    assert out.answers == digit_answers(out)
    for b in range(2):
        assert out.chosen_index[b].item() == reference_majority(out.answers[b])


def test_one_search_config_is_the_keywords_of_generate(model):
    ids, mask = PROMPTS
    settings = {"max_new_tokens": 20, **SEARCHY}
    config = SearchConfig(search="dvts", num_candidates=8, beam_width=2, ranking="last", seed=[3, 4])
    out = search_generate(model, ids, attention_mask=mask, search_config=config, **settings)
    by_keywords = model.generate(
        ids, attention_mask=mask, search="dvts", num_candidates=8, beam_width=2, ranking="last", seed=[3, 4], **settings
    )
    assert torch.equal(out.candidates, by_keywords.candidates) and torch.equal(
        out.chosen_index, by_keywords.chosen_index
    )
    assert config.reasoning_effort is None and config.beam_width == 2  # the caller's config is left as it was
    with pytest.raises(ValueError, match="either as keywords or as `search_config`"):
        search_generate(model, ids, search_config=config, beam_width=4)
    assert SearchConfig(search="beam").resolved({"medium": 8}).beam_width == 4


def test_search_errors_are_clear(model):
    ids = torch.tensor([[1, 6, 9]])
    with pytest.raises(ValueError, match="Unknown `search`"):
        model.generate(ids, search="mcts", num_candidates=4)
    for bad in (3, 0, 16):
        with pytest.raises(ValueError, match="multiple of M"):
            model.generate(ids, search="beam", num_candidates=8, beam_width=bad)
    with pytest.raises(ValueError, match="`ranking`"):
        model.generate(ids, search="dvts", num_candidates=4, beam_width=2, ranking="best")
    with pytest.raises(ValueError, match="best_of_n'` only"):
        model.generate(ids, search="beam", num_candidates=4, beam_width=2, prune_top_k=1)
    with pytest.raises(ValueError, match="`beam_width` applies"):
        model.generate(ids, num_candidates=4, beam_width=2)


# ----------------------------------------------------------------------------------- pruning that removes rows


def test_pruning_with_rows_removed_keeps_the_same_trajectories(model):
    ids, mask = PROMPTS
    for options in ({"prune_top_k": 2, "prune_min_steps": 1}, {"prune_threshold": 0.45, "prune_min_steps": 1}):
        kwargs = {"attention_mask": mask, "num_candidates": 6, "max_new_tokens": 40, "progress_bar": False}
        for seed in (9, 10):
            shapes: dict[bool, list] = {True: [], False: []}
            outs = {}
            for remove in (True, False):
                handle = model.model.embed_tokens.register_forward_hook(
                    lambda _m, inputs, _o, seen=shapes[remove]: seen.append(inputs[0].shape[0])
                )
                try:
                    outs[remove] = model.generate(
                        ids, seed=seed, remove_stopped_rows=remove, **kwargs, **options, **STEPPY
                    )
                finally:
                    handle.remove()
            removed, kept = outs[True], outs[False]
            assert torch.equal(removed.candidates, kept.candidates) and torch.equal(removed.pruned, kept.pruned)
            # Same tokens; the logits of a row may differ in the last bits with the batch size.
            torch.testing.assert_close(removed.scores, kept.scores)
            assert removed.tokens_saved == kept.tokens_saved
            assert removed.pruned.any()
            # rows kept as padding go through every forward; removed rows do not
            assert sum(shapes[True]) < sum(shapes[False])
            assert set(shapes[False][2:]) == {12}


# ----------------------------------------------------------------------------------- remote code

assert "\nout = {}\n" in CLEAN_LOADER
SEARCH_LOADER = CLEAN_LOADER.split("\nout = {}\n")[0] + textwrap.dedent(
    """
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids, mask = torch.tensor(ids[0]), torch.tensor(ids[1])
    result = {}
    for search in ("beam", "dvts"):
        out = model.generate(ids, attention_mask=mask, search=search, num_candidates=4, beam_width=2, seed=5,
                             max_new_tokens=16, pad_token_id=0, eos_token_id=8,
                             sequence_bias={(5,): 1.5, (8,): 1.0}, progress_bar=False)
        b, n, t = out.candidates.shape
        offline = model.score_trajectories(out.candidates.view(b * n, t), out.candidate_attention_mask.view(b * n, t))
        result[search] = {"module": type(out).__module__, "candidates": out.candidates.tolist(),
                          "online": out.log_scores.flatten().tolist(), "offline": offline.log_scores.tolist()}
    print(json.dumps(result))
    """
)


def test_search_from_a_remote_code_checkpoint(model, tmp_path):
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    for name in REMOTE_CODE_SET:
        assert (folder / name).exists(), name
    ids, mask = PROMPTS
    got = run_without_package(SEARCH_LOADER, tmp_path, str(folder), json.dumps([ids.tolist(), mask.tolist()]))
    for search in ("beam", "dvts"):
        result = got[search]
        assert result["module"].startswith("transformers_modules")
        online, offline = torch.tensor(result["online"]), torch.tensor(result["offline"])
        assert torch.equal(torch.isfinite(online), torch.isfinite(offline))
        finite = torch.isfinite(offline)
        assert (online[finite] - offline[finite]).abs().max() <= 1e-4
        expected = model.generate(
            ids, attention_mask=mask, search=search, num_candidates=4, beam_width=2, seed=5, max_new_tokens=16,
            pad_token_id=0, eos_token_id=8, sequence_bias={(5,): 1.5, (8,): 1.0}, progress_bar=False,
        )  # fmt: skip
        assert torch.equal(torch.tensor(result["candidates"]), expected.candidates)


def test_pruned_candidates_never_win(model):
    ids, mask = PROMPTS
    for seed in range(6):
        out = model.generate(
            ids, attention_mask=mask, num_candidates=6, seed=seed, max_new_tokens=40, prune_top_k=2,
            prune_min_steps=1, progress_bar=False, **STEPPY,
        )  # fmt: skip
        for b in range(2):
            finished = (~out.pruned[b]).nonzero().flatten()
            assert not out.pruned[b, out.chosen_index[b]]
            best = finished[torch.argmax(out.log_scores[b, finished].double())]
            assert out.chosen_index[b] == best  # the best of the candidates that finished


def test_sliding_window_caches_are_refused_by_step_search():
    model = tiny_metastone(text_overrides={"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0})
    with pytest.raises(ValueError, match="full-attention cache layers"):
        model.generate(
            torch.tensor([[1, 6, 9, 10]]), search="beam", num_candidates=4, beam_width=2, max_new_tokens=20,
            sequence_bias={(STEP,): 3.0}, pad_token_id=PAD, progress_bar=False,
        )  # fmt: skip
