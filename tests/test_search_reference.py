"""Beam search and DVTS against a slow reference that decodes every beam alone (``reference_search.py``).

Two prompts of different lengths share the engine's batch, whose rows are parked, merged with rows of other lengths
and prompts, and re-batched with their caches; the reference decodes each prompt alone, one row at a time, with no
cache and transformers' processors built for that prompt alone, under the paper's repetition penalty, top-p and
``min_new_tokens``. They must agree on every distribution sampled from, every sample, every node of the tree (which
beams survive a round, how many children each gets, which child a subtree keeps), the candidates and the pick.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from conftest import STEP, THINK
from reference_search import reference_processors, reference_step_search
from test_generation_metastone import EOS, PAD, left_padded
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from metastone_hf.sampling_metastone import RowwiseSampler
from metastone_hf.tiny import tiny_metastone

QUESTIONS = [[1, THINK, 9, 10, STEP, 11], [2, 3, THINK, 12, 13, 14, 15, 16]]
SEEDS = [7, 8]
# Steps every few tokens and EOS now and then: several rounds, and candidates that finish at different depths.
SAMPLING = {
    "temperature": 0.8, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.05, "min_new_tokens": 3,
    "max_new_tokens": 24, "sequence_bias": {(STEP,): 3.5, (EOS,): 2.0}, "eos_token_id": EOS, "pad_token_id": PAD,
}  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return tiny_metastone(seed=51)


def engine_search(model, monkeypatch, search, n, m, ranking):
    """The engine's output, and the distribution each (prompt, draw of its generator, slot) sampled from."""
    seen: dict[tuple[int, int, int], torch.Tensor] = {}
    draws: dict[int, int] = defaultdict(int)
    sample = RowwiseSampler.sample

    def recording(self, probs, slot, prompt, slots_per_prompt, alive):
        first_slot = slots_per_prompt.cumsum(0) - slots_per_prompt
        for b in prompt[alive].unique().tolist():
            for i in ((prompt == b) & alive).nonzero().flatten().tolist():
                seen[(b, draws[b], int(slot[i] - first_slot[b]))] = probs[i].log()
            draws[b] += 1
        return sample(self, probs, slot, prompt, slots_per_prompt, alive)

    monkeypatch.setattr(RowwiseSampler, "sample", recording)
    ids, mask = left_padded(QUESTIONS)
    out = model.generate(
        ids, attention_mask=mask, search=search, num_candidates=n, beam_width=m, ranking=ranking, seed=SEEDS,
        **SAMPLING,
    )  # fmt: skip
    monkeypatch.setattr(RowwiseSampler, "sample", sample)
    return out, seen


def generated_part(out, b: int, j: int) -> list[int]:
    n = int(out.num_generated_tokens[b, j])
    real = out.candidates[b, j][out.candidate_attention_mask[b, j].bool()]
    return real[len(real) - n :].tolist()


# M = 1 keeps every beam that reached a step: N children shared by, say, 3 of them, the better-ranked get more.
CASES = [("beam", 8, 2), ("beam", 8, 4), ("beam", 8, 1), ("beam", 6, 3), ("dvts", 8, 2), ("dvts", 8, 4)]


@pytest.mark.parametrize("ranking", ["mean", "last"])
@pytest.mark.parametrize(("search", "n", "m"), CASES)
def test_step_search_equals_the_slow_reference(model, monkeypatch, search, n, m, ranking):
    out, engine_distributions = engine_search(model, monkeypatch, search, n, m, ranking)
    width = out.candidates.shape[-1] - int(out.num_generated_tokens.max())
    selections = cut = rounds = uneven = 0
    for b, question in enumerate(QUESTIONS):
        reference = reference_step_search(model, question, search, n, m, ranking, SEEDS[b], SAMPLING)

        # every distribution a row sampled from, processed as transformers processes that row alone
        mine = {(d, s): lp for (p, d, s), lp in engine_distributions.items() if p == b}
        assert mine.keys() == reference.distributions.keys()
        cut += sum(int((~torch.isfinite(lp)).any()) for lp in mine.values())
        for draw_slot, expected in reference.distributions.items():
            got = mine[draw_slot]
            assert torch.equal(torch.isfinite(got), torch.isfinite(expected)), draw_slot  # the same top-p cut
            finite = torch.isfinite(expected)
            torch.testing.assert_close(got[finite], expected[finite], atol=2e-5, rtol=0)

        # the tree: every node's parent, round, subtree, segment, status (survived, dropped, returned) and score
        tree = out.search_tree[b]
        assert len(tree) == len(reference.nodes)
        for node, expected in zip(tree[1:], reference.nodes[1:]):
            assert (node.parent, node.round, node.group, node.status) == (
                expected.parent, expected.round, expected.group, expected.status,
            ), node.id  # fmt: skip
            assert (node.start - width, node.end - width) == (expected.first, expected.last), node.id
            if expected.step_score is None:
                assert node.step_score is None
            else:
                assert abs(node.step_score - expected.step_score) <= 1e-4
        selections += sum(1 for node in reference.nodes if node.status == "dropped")
        rounds = max(rounds, max(node.round for node in reference.nodes))
        fanouts = defaultdict(list)
        for i, node in enumerate(reference.nodes[1:], 1):
            fanouts[node.parent].append(i)
        uneven += sum(1 for parent, kids in fanouts.items() if parent and len(kids) not in (m, n))

        # the candidates, their scores and the pick
        assert out.candidate_nodes[b].tolist() == reference.candidate_nodes
        assert [generated_part(out, b, j) for j in range(n)] == reference.candidates
        torch.testing.assert_close(
            out.scores[b].double(), torch.tensor(reference.scores, dtype=torch.float64), atol=1e-4, rtol=0
        )
        assert int(out.chosen_index[b]) == reference.chosen_index
    assert selections > 0  # beams were really dropped: the ranking decided something
    assert cut > 0  # top-p really cut some distributions
    assert rounds >= 3
    if m == 1:
        assert uneven > 0  # survivors that got more than M children, unevenly, did occur


def test_the_reference_applies_the_papers_processors(model):
    _, processors = reference_processors(model, QUESTIONS[0], SAMPLING)
    kinds = {type(p) for p in processors}
    assert {
        RepetitionPenaltyLogitsProcessor,
        MinNewTokensLengthLogitsProcessor,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    } <= kinds
