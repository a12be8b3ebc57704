"""Best-of-N generation: online SPRM scores, prefill once, selection strategies, pruning, remote code."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import pytest
import torch
from conftest import END_THINK, STEP, THINK
from reference import reference_majority, reference_sprm_vote
from test_modeling_metastone import plain_twin
from test_remote_code import CLEAN_LOADER, run_without_package
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from metastone_hf import SearchOutput
from metastone_hf.selection_metastone import (
    extract_boxed_answer,
    last_boxed_content,
    select_majority,
    select_sprm,
    select_sprm_vote,
)
from metastone_hf.tiny import tiny_metastone

EOS, PAD = 8, 0
# Make step tokens (and, where asked, EOS) frequent in samples of a random tiny model.
STEPPY = {"sequence_bias": {(STEP,): 2.5}, "pad_token_id": PAD}


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


# Prompt 0 has a step token inside the think span (scored from the prefill); prompt 1 ends with one.
PROMPTS = left_padded([[1, THINK, 9, 10, STEP, 11], [1, 2, 3, THINK, 12, 13, 14, STEP]])


@pytest.fixture(scope="module")
def model():
    return tiny_metastone(seed=31)


def offline(model, out: SearchOutput):
    b, n, t = out.candidates.shape
    return model.score_trajectories(out.candidates.view(b * n, t), out.candidate_attention_mask.view(b * n, t))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def assert_online_equals_offline(model, out: SearchOutput) -> None:
    b, n, _ = out.candidates.shape
    ref = offline(model, out)
    assert torch.equal(out.num_steps.flatten(), ref.num_steps)
    finite = torch.isfinite(ref.log_scores)
    assert torch.equal(torch.isfinite(out.log_scores.flatten()), finite)
    assert (out.scores.flatten() - ref.scores).abs().max() <= 1e-4
    assert max_diff(out.log_scores.flatten()[finite], ref.log_scores[finite]) <= 1e-4
    for i in range(b * n):
        got = out.step_scores[i // n][i % n]
        assert max_diff(got, ref.step_scores[i]) <= 1e-4
        assert torch.equal(out.step_positions[i // n][i % n], ref.step_positions[i])


# ----------------------------------------------------------------------------------- plain generate unchanged


def test_plain_generate_is_transformers_generate_positional_and_keyword(model):
    twin = plain_twin(model)
    ids, mask = PROMPTS
    config = GenerationConfig(do_sample=True, max_new_tokens=10, pad_token_id=PAD)
    torch.manual_seed(3)
    ours = model.generate(ids, config, attention_mask=mask)  # positional generation_config
    torch.manual_seed(3)
    stock = twin.generate(ids, config, attention_mask=mask)
    assert torch.equal(ours, stock)
    torch.manual_seed(4)
    ours = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True)
    torch.manual_seed(4)
    stock = twin.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True)
    assert type(ours) is type(stock) and torch.equal(ours.sequences, stock.sequences)
    with pytest.raises(ValueError, match="only apply to search generation"):
        model.generate(ids, selection="majority")


def test_generate_with_inputs_embeds_is_transformers_generate(model):
    """transformers' own generation tests run `inputs_embeds` on every causal LM; PEFT prompt tuning relies on it."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    twin = plain_twin(model)
    ids = torch.tensor([[1, THINK, 9, 10, STEP, 11]])
    embeds = model.get_input_embeddings()(ids).detach()
    for sampling in ({"do_sample": False}, {"do_sample": True, "top_k": 0}):
        for given in ({"inputs_embeds": embeds}, {"input_ids": ids, "inputs_embeds": embeds}):
            torch.manual_seed(2)
            ours = model.generate(**given, max_new_tokens=8, pad_token_id=PAD, **sampling)
            torch.manual_seed(2)
            stock = twin.generate(**given, max_new_tokens=8, pad_token_id=PAD, **sampling)
            assert torch.equal(ours, stock)
    prompt_tuned = {}
    fresh = tiny_metastone(seed=31)  # PEFT wraps and freezes its model: keep the module's one untouched
    for name, backbone in (("ours", fresh), ("stock", plain_twin(fresh))):
        torch.manual_seed(3)  # the same virtual-token embeddings for both
        peft_model = get_peft_model(backbone, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
        prompt_tuned[name] = peft_model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=PAD
        )
    assert torch.equal(prompt_tuned["ours"], prompt_tuned["stock"])
    with pytest.raises(ValueError, match="found in the token ids, so pass `input_ids`"):
        model.generate(inputs_embeds=embeds, num_candidates=2, max_new_tokens=4)


# ----------------------------------------------------------------------------------- sampling equality


def test_prefill_once_same_samples_as_num_return_sequences(model):
    ids, mask = PROMPTS
    kwargs = {**STEPPY, "max_new_tokens": 24, "eos_token_id": EOS}
    torch.manual_seed(11)
    expected = model.generate(ids, attention_mask=mask, do_sample=True, num_return_sequences=4, **kwargs)

    shapes = []
    handle = model.model.embed_tokens.register_forward_hook(lambda _m, inputs, _o: shapes.append(inputs[0].shape))
    try:
        out = model.generate(ids, attention_mask=mask, num_candidates=4, seed=11, progress_bar=False, **kwargs)
    finally:
        handle.remove()
    assert isinstance(out, SearchOutput)
    assert torch.equal(out.candidates.flatten(0, 1), expected)
    # The prompt went through the model once at batch size B (its last token too); then one new token per candidate
    # and step, in a batch that shrinks as candidates stop (EOS).
    assert shapes[0] == (2, ids.shape[1] - 1) and shapes[1] == (2, 1)
    batch_sizes = [s[0] for s in shapes[2:]]
    assert all(s[1] == 1 for s in shapes[1:]) and batch_sizes[0] == 8
    assert batch_sizes == sorted(batch_sizes, reverse=True) and batch_sizes[-1] < 8
    assert out.tokens_processed == sum(s[0] * s[1] for s in shapes)
    assert torch.equal(out.sequences, out.candidates[torch.arange(2), out.chosen_index])


def test_one_candidate_equals_plain_sampling(model):
    ids, mask = PROMPTS
    torch.manual_seed(5)
    expected = model.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=16, **STEPPY)
    out = model.generate(
        ids, attention_mask=mask, num_candidates=1, seed=5, max_new_tokens=16, progress_bar=False, **STEPPY
    )
    assert torch.equal(out.sequences, expected) and out.chosen_index.tolist() == [0, 0]


def test_seed_is_reproducible_and_leaves_the_global_rng_alone(model):
    ids, mask = PROMPTS
    state = torch.get_rng_state()
    first = model.generate(ids, attention_mask=mask, num_candidates=3, seed=7, max_new_tokens=8, progress_bar=False)
    assert torch.equal(torch.get_rng_state(), state)
    second = model.generate(ids, attention_mask=mask, num_candidates=3, seed=7, max_new_tokens=8, progress_bar=False)
    assert torch.equal(first.candidates, second.candidates) and torch.equal(first.scores, second.scores)


def test_search_shows_no_progress_bar_unless_asked(model, capsys):
    # transformers' `generate` shows none; a library call must not write to the caller's stderr by default.
    ids = torch.tensor([[1, THINK, 9]])
    for search in ("best_of_n", "beam", "dvts"):
        model.generate(ids, search=search, num_candidates=2, seed=0, max_new_tokens=4, pad_token_id=PAD)
        assert "search" not in capsys.readouterr().err
    model.generate(ids, num_candidates=2, seed=0, max_new_tokens=4, pad_token_id=PAD, progress_bar=True)
    assert "search" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- online == offline


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_online_scores_equal_score_trajectories(architecture):
    model = tiny_metastone(architecture, seed=32)
    ids, mask = PROMPTS
    # EOS ends some candidates early; others run to max_new_tokens; `</think>` appears in some.
    bias = {(STEP,): 2.5, (EOS,): 1.0, (END_THINK,): 1.0}
    out = model.generate(
        ids,
        attention_mask=mask,
        num_candidates=6,
        seed=1,
        max_new_tokens=40,
        eos_token_id=EOS,
        pad_token_id=PAD,
        sequence_bias=bias,
        progress_bar=True,
    )
    generated = out.candidates[..., ids.shape[1] :]
    assert (generated == EOS).any(dim=-1).any() and not (generated == EOS).any(dim=-1).all()  # both cases occur
    assert (out.num_steps > 0).all()
    assert_online_equals_offline(model, out)
    # everything after the first EOS is padding, marked 0 in the mask
    row = (generated == EOS).any(-1).flatten().nonzero()[0].item()
    gen_mask = out.candidate_attention_mask.flatten(0, 1)[row, ids.shape[1] :]
    first_eos = (generated.flatten(0, 1)[row] == EOS).nonzero()[0].item()
    assert gen_mask[: first_eos + 1].all() and not gen_mask[first_eos + 1 :].any()
    generated_mask = out.candidate_attention_mask[..., ids.shape[1] :]
    assert torch.equal(out.num_generated_tokens, generated_mask.sum(-1))


class StopAfterToken(StoppingCriteria):
    """The caller's own criterion: stops a row once it samples `token` (and nothing else)."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_callers_stopping_criterion_stops_single_rows(model):
    ids, mask = PROMPTS
    out = model.generate(
        ids, attention_mask=mask, num_candidates=6, seed=8, max_new_tokens=30,
        stopping_criteria=StoppingCriteriaList([StopAfterToken(END_THINK)]),
        sequence_bias={(STEP,): 2.5, (END_THINK,): 1.5}, pad_token_id=PAD, progress_bar=False,
    )  # fmt: skip
    p = ids.shape[1]
    stopped = 0
    for row, row_mask in zip(out.candidates.flatten(0, 1), out.candidate_attention_mask.flatten(0, 1)):
        hits = (row[p:] == END_THINK).nonzero().flatten()
        if hits.numel():  # real up to and including `</think>`, then padding
            stopped += 1
            assert row_mask[p : p + hits[0] + 1].all() and not row_mask[p + hits[0] + 1 :].any()
            assert (row[p + hits[0] + 1 :] == PAD).all()  # padded, though `_sample` kept sampling it (no EOS)
        else:
            assert row_mask[p:].all()
    assert 0 < stopped < 12
    assert_online_equals_offline(model, out)


def test_without_think_end_and_without_steps(model):
    ids, mask = PROMPTS
    # `</think>` never emitted: the span runs to the end of the candidate (the mask's rule), still exact.
    out = model.generate(
        ids,
        attention_mask=mask,
        num_candidates=3,
        seed=2,
        max_new_tokens=20,
        suppress_tokens=[END_THINK],
        progress_bar=False,
        **STEPPY,
    )
    assert not (out.candidates == END_THINK).any()
    assert (out.num_steps > 0).all()
    assert_online_equals_offline(model, out)

    # No step anywhere (prompt without step, step token suppressed): score 0, log score -inf, candidate 0 chosen.
    plain_ids = torch.tensor([[1, THINK, 9, 10]])
    out = model.generate(
        plain_ids, num_candidates=3, seed=2, max_new_tokens=12, suppress_tokens=[STEP], progress_bar=False
    )
    assert out.num_steps.tolist() == [[0, 0, 0]]
    assert out.scores.tolist() == [[0.0, 0.0, 0.0]] and torch.isneginf(out.log_scores).all()
    assert out.chosen_index.tolist() == [0] and all(s.numel() == 0 for s in out.step_scores[0])
    assert_online_equals_offline(model, out)


def test_prompt_without_think_is_scored_from_the_start(model):
    ids = torch.tensor([[1, 9, STEP, 10, 11]])
    out = model.generate(ids, num_candidates=2, seed=3, max_new_tokens=15, progress_bar=False, **STEPPY)
    assert (out.num_steps >= 1).all()  # at least the prompt's own step
    assert_online_equals_offline(model, out)


# ----------------------------------------------------------------------------------- effort presets, errors


def test_reasoning_effort_presets_map_to_2_8_32(model):
    ids = torch.tensor([[1, THINK, 9]])
    for effort, n in (("low", 2), ("medium", 8), ("high", 32)):
        out = model.generate(ids, reasoning_effort=effort, seed=0, max_new_tokens=2, progress_bar=False)
        assert out.candidates.shape == (1, n, 5) and out.scores.shape == (1, n)


def test_clear_errors(model):
    ids = torch.tensor([[1, THINK, 9]])
    with pytest.raises(ValueError, match=r"'low' \(N=2\), 'medium' \(N=8\), 'high' \(N=32\)"):
        model.generate(ids, reasoning_effort="extreme")
    for bad in (0, -1):
        with pytest.raises(ValueError, match="num_candidates"):
            model.generate(ids, num_candidates=bad)
    with pytest.raises(ValueError, match="not both"):
        model.generate(ids, num_candidates=2, reasoning_effort="low")
    with pytest.raises(ValueError, match="Unknown `selection`"):
        model.generate(ids, num_candidates=2, selection="best")
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(ids, num_candidates=2, selection="majority")
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(ids, num_candidates=2, num_return_sequences=2)
    with pytest.raises(ValueError, match="do_sample"):
        model.generate(ids, num_candidates=2, do_sample=False)


# ----------------------------------------------------------------------------------- selection strategies


def test_selection_strategies_on_hand_built_candidates():
    scores = torch.tensor([0.9, 0.2, 0.3, 0.35, 0.1])
    answers = ["7", "3", "3", "3", None]
    assert select_sprm(scores, answers) == 0
    assert select_majority(scores, answers) == 1  # "3" wins 3 votes to 1; its first candidate
    assert select_sprm_vote(scores, answers) == 0  # "7": 0.9 > "3": 0.85
    assert select_sprm_vote(torch.tensor([0.5, 0.2, 0.3, 0.35, 0.1]), answers) == 3  # "3": 0.85 > 0.5; its best
    # no answers at all: sprm_vote falls back to the SPRM argmax, majority to the first candidate
    assert select_sprm_vote(scores[1:], [None] * 4) == 2 and select_majority(scores[1:], [None] * 4) == 0
    # ties: majority keeps the answer seen first; NaN scores rank last and weigh nothing
    assert select_majority(torch.zeros(4), ["a", "b", "b", "a"]) == 0
    nan_scores = torch.tensor([float("nan"), 0.4, 0.3])
    assert select_sprm(nan_scores) == 1
    assert select_sprm_vote(nan_scores, ["x", "x", "y"]) == 1


def test_boxed_answer_extraction_with_math_verify():
    assert last_boxed_content(r"first \boxed{1} then \boxed{\frac{a}{b}} end") == r"\frac{a}{b}"
    assert last_boxed_content(r"cut \boxed{12") is None and last_boxed_content("none") is None
    assert extract_boxed_answer(r"so \boxed{\frac{1}{2}}") == extract_boxed_answer(r"\boxed{0.5}") == "1/2"
    assert extract_boxed_answer(r"x = \boxed{3} and then \boxed{4}") == "4"
    assert extract_boxed_answer("no box here") is None


def test_missing_math_verify_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` raise ImportError
    with pytest.raises(ImportError, match="math-verify"):
        extract_boxed_answer(r"\boxed{1}")


class DigitTokenizer:
    """Decodes a completion to its count of step tokens, boxed mod 3: candidates then share answers."""

    def decode(self, ids, skip_special_tokens=True):
        return rf"\boxed{{{sum(1 for t in ids if t == STEP) % 3}}}"


def digit_answers(out) -> list[list[str]]:
    """What [`DigitTokenizer`] and the default extractor make of each candidate: its step tokens counted mod 3."""
    answers = []
    for b in range(out.candidates.shape[0]):
        row = []
        for j in range(out.candidates.shape[1]):
            n = int(out.num_generated_tokens[b, j])
            real = out.candidates[b, j][out.candidate_attention_mask[b, j].bool()]
            row.append(str(sum(1 for t in real[len(real) - n :].tolist() if t == STEP) % 3))
        answers.append(row)
    return answers


def test_selection_strategies_equal_the_slow_reference_on_random_votes():
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        n = int(torch.randint(1, 9, (1,), generator=generator))
        scores = torch.rand(n, generator=generator, dtype=torch.float64)
        scores = torch.where(torch.rand(n, generator=generator) < 0.1, float("nan"), scores)
        scores = torch.where(torch.rand(n, generator=generator) < 0.2, 0.5, scores)  # ties
        pool = ["a", "b", "c", None]
        answers = [pool[int(i)] for i in torch.randint(0, 4, (n,), generator=generator)]
        assert select_majority(scores, answers) == reference_majority(answers), (scores, answers)
        assert select_sprm_vote(scores, answers) == reference_sprm_vote(scores.tolist(), answers), (scores, answers)
        best = max(range(n), key=lambda j: (-1.0 if math.isnan(scores[j]) else float(scores[j]), -j))
        assert select_sprm(scores) == best


@pytest.mark.parametrize("selection", ["sprm_vote", "majority"])
def test_voting_end_to_end(model, selection):
    ids, mask = PROMPTS
    out = model.generate(
        ids,
        attention_mask=mask,
        num_candidates=6,
        seed=4,
        max_new_tokens=16,
        selection=selection,
        tokenizer=DigitTokenizer(),
        progress_bar=False,
        **STEPPY,
    )
    assert len(out.answers) == 2 and all(len(a) == 6 for a in out.answers)
    assert out.answers == digit_answers(out)
    for b in range(2):
        scores = out.log_scores[b].double().exp().tolist()
        expected = reference_sprm_vote(scores, out.answers[b]) if selection == "sprm_vote" else None
        expected = reference_majority(out.answers[b]) if expected is None else expected
        assert out.chosen_index[b].item() == expected
    assert len({a for answers in out.answers for a in answers}) > 1  # the vote had something to decide
    # a custom strategy is a plain function; it gets the answers when a tokenizer is given
    seen = []
    out = model.generate(
        ids,
        attention_mask=mask,
        num_candidates=3,
        seed=4,
        max_new_tokens=4,
        tokenizer=DigitTokenizer(),
        selection=lambda scores, answers: seen.append(answers) or 2,
        progress_bar=False,
    )
    assert out.chosen_index.tolist() == [2, 2] and len(seen) == 2 and len(seen[0]) == 3


# ----------------------------------------------------------------------------------- pruning


def test_pruning_off_changes_nothing_and_on_saves_tokens(model):
    ids, mask = PROMPTS
    kwargs = {"attention_mask": mask, "num_candidates": 6, "seed": 9, "max_new_tokens": 40, "progress_bar": False}
    full = model.generate(ids, **kwargs, **STEPPY)
    assert not full.pruned.any() and full.tokens_saved == 0
    # pruning that can never fire (keep the top N / an impossible threshold) is the unpruned run
    for options in ({"prune_top_k": 6}, {"prune_threshold": 1e-30}):
        same = model.generate(ids, **kwargs, **options, **STEPPY)
        assert torch.equal(same.candidates, full.candidates) and torch.equal(same.scores, full.scores)
        assert torch.equal(same.chosen_index, full.chosen_index) and not same.pruned.any()

    pruned = model.generate(ids, **kwargs, prune_top_k=2, prune_min_steps=1, **STEPPY)
    assert pruned.pruned.any() and pruned.tokens_saved > 0
    assert (~pruned.pruned).any(dim=1).all()  # every prompt keeps a candidate that finishes
    assert pruned.num_generated_tokens.sum() + pruned.tokens_saved == full.num_generated_tokens.sum()
    # same seed: every candidate is a prefix of its unpruned twin (pruned rows are padded after the cut)
    p = ids.shape[1]
    for b in range(2):
        for j in range(6):
            length = p + int(pruned.num_generated_tokens[b, j])
            assert torch.equal(pruned.candidates[b, j, :length], full.candidates[b, j, :length])
            assert (pruned.candidates[b, j, length:] == PAD).all()
    assert torch.equal(pruned.candidates[~pruned.pruned], full.candidates[~pruned.pruned])
    assert_online_equals_offline(model, pruned)

    # a threshold every candidate falls under: all are stopped but each prompt's best running one
    strict = model.generate(ids, **kwargs, prune_threshold=0.999, prune_min_steps=1, **STEPPY)
    assert strict.pruned.sum(dim=1).tolist() == [5, 5] and strict.tokens_saved > pruned.tokens_saved
    kept = strict.candidates[~strict.pruned]
    assert torch.equal(kept, full.candidates[~strict.pruned])  # the survivor ran to the end, unchanged


# ----------------------------------------------------------------------------------- remote code


assert "\nout = {}\n" in CLEAN_LOADER  # keep its blocking preamble, replace its body
BEST_OF_N_LOADER = CLEAN_LOADER.split("\nout = {}\n")[0] + textwrap.dedent(
    """
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids, mask = torch.tensor(ids[0]), torch.tensor(ids[1])
    out = model.generate(ids, attention_mask=mask, num_candidates=3, seed=6, max_new_tokens=12,
                         pad_token_id=0, sequence_bias={(5,): 2.5}, progress_bar=False)
    print(json.dumps({"module": type(out).__module__, "candidates": out.candidates.tolist(),
                      "scores": out.scores.tolist(), "chosen": out.chosen_index.tolist()}))
    """
)


def test_best_of_n_from_a_remote_code_checkpoint(model, tmp_path):
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    assert (folder / "generation_metastone.py").exists()
    ids, mask = PROMPTS
    got = run_without_package(BEST_OF_N_LOADER, tmp_path, str(folder), json.dumps([ids.tolist(), mask.tolist()]))
    assert got["module"].startswith("transformers_modules") and got["module"].endswith("search_output_metastone")
    expected = model.generate(
        ids, attention_mask=mask, num_candidates=3, seed=6, max_new_tokens=12, progress_bar=False, **STEPPY
    )
    assert torch.equal(torch.tensor(got["candidates"]), expected.candidates)
    torch.testing.assert_close(torch.tensor(got["scores"]), expected.scores)
    assert got["chosen"] == expected.chosen_index.tolist()


def test_stop_strings_stop_single_rows(model, real_tokenizer):
    ids, mask = PROMPTS
    stop = real_tokenizer.decode([300])  # a token the tiny model can sample; made frequent below
    assert real_tokenizer.encode(stop, add_special_tokens=False) == [300]
    out = model.generate(
        ids, attention_mask=mask, num_candidates=4, seed=12, max_new_tokens=30, stop_strings=[stop],
        tokenizer=real_tokenizer, sequence_bias={(STEP,): 2.5, (300,): 2.0}, pad_token_id=PAD, progress_bar=False,
    )  # fmt: skip
    p = ids.shape[1]
    stopped = 0
    for row, row_mask in zip(out.candidates.flatten(0, 1), out.candidate_attention_mask.flatten(0, 1)):
        hits = (row[p:] == 300).nonzero().flatten()
        if hits.numel():
            stopped += 1
            assert row_mask[p : p + hits[0] + 1].all() and not row_mask[p + hits[0] + 1 :].any()
    assert stopped > 0
    assert_online_equals_offline(model, out)


def test_scores_just_below_one_do_not_tie():
    # exp(mean logsigmoid) of logits 18 vs 25 are both 1.0 in float32; float64 ranking keeps them apart
    log_scores = torch.nn.functional.logsigmoid(torch.tensor([18.0, 25.0]))
    assert log_scores.exp().tolist() == [1.0, 1.0]
    assert select_sprm(log_scores.double().exp()) == 1


def test_online_scores_with_several_step_tokens_equal_score_trajectories():
    # As in the paper / zh step modes: several ids end a step, and a run mixing them counts once.
    other_step = 11
    model = tiny_metastone(seed=33, step_token_ids=[STEP, other_step])
    ids, mask = PROMPTS
    bias = {(STEP,): 2.0, (other_step,): 2.0, (EOS,): 0.5, (END_THINK,): 0.5}
    out = model.generate(
        ids, attention_mask=mask, num_candidates=6, seed=2, max_new_tokens=40, eos_token_id=EOS, pad_token_id=PAD,
        sequence_bias=bias, progress_bar=False,
    )  # fmt: skip
    generated = out.candidates[..., ids.shape[1] :]
    mixed_runs = ((generated[..., 1:] == STEP) & (generated[..., :-1] == other_step)) | (
        (generated[..., 1:] == other_step) & (generated[..., :-1] == STEP)
    )
    assert mixed_runs.any() and (generated == other_step).any()
    assert_online_equals_offline(model, out)


@pytest.mark.parametrize("search", ["best_of_n", "beam", "dvts"])
def test_sampling_settings_without_do_sample_raise_no_ignored_flags_warning(search, monkeypatch):
    """Search always samples, so `temperature` / `top_p` given without `do_sample=True` are used, and transformers'
    warning that they "may be ignored" would be wrong."""
    import transformers.generation.configuration_utils as configuration_utils

    messages = []
    monkeypatch.setattr(configuration_utils.logger, "warning_once", lambda message, *a, **k: messages.append(message))
    monkeypatch.setattr(configuration_utils.logger, "warning", lambda message, *a, **k: messages.append(message))
    model = tiny_metastone()
    model.generate(torch.tensor([[1, 6, 11, 12]]), max_new_tokens=6, num_candidates=4, search=search,
                   temperature=0.6, top_p=0.95)  # fmt: skip
    assert not [m for m in messages if "not valid" in str(m)], messages
    # The same settings in plain `generate` (greedy) do warn: the check sees the warning when there is one.
    model.generate(torch.tensor([[1, 6, 11, 12]]), max_new_tokens=2, temperature=0.6, top_p=0.95)
    assert [m for m in messages if "not valid" in str(m)]
