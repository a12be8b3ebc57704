"""The step mask and trajectory score against the slow reference (the official rules 1-5)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import END_THINK, STEP, THINK
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_score_positions, reference_trajectory_score

from metastone_hf import sprm_score_mask, sprm_step_token_mask, sprm_trajectory_log_scores
from metastone_hf.scoring_metastone import IncrementalStepRule


def score_positions(ids, step_ids=(STEP,), think_start=THINK, think_end=END_THINK, attention_mask=None):
    ids_t = torch.tensor([ids]) if not isinstance(ids, torch.Tensor) else ids
    mask = sprm_step_token_mask(ids_t, list(step_ids), think_start, think_end, attention_mask)
    return sprm_score_mask(mask)[0].nonzero().flatten().tolist()


# ---------------------------------------------------------------- hand-built cases, one per rule
def test_rule1_only_step_tokens_are_steps():
    #        0  1      2  3     4  5  6
    ids = [1, THINK, 9, STEP, 9, 8, STEP]
    assert score_positions(ids) == [2, 5]


def test_rule2_only_first_of_a_run():
    ids = [1, THINK, 9, STEP, STEP, STEP, 9, STEP, STEP]
    assert score_positions(ids) == [2, 6]


def test_rule3_step_right_after_think_is_dropped():
    ids = [1, THINK, STEP, 9, STEP]
    assert score_positions(ids) == [3]
    # the run that starts right after <think> is dropped entirely (its first token by rule 3, the rest by rule 2)
    assert score_positions([1, THINK, STEP, STEP, 9, STEP]) == [4]


def test_rule4_only_inside_first_think_and_last_end_think():
    ids = [9, STEP, 1, THINK, 9, STEP, 9, END_THINK, 9, STEP, END_THINK, 9, STEP]
    # the step before <think> and the one after the last </think> are outside; the one between two </think> counts
    assert score_positions(ids) == [4, 8]
    # a second <think> does not move the start
    assert score_positions([THINK, 9, STEP, THINK, 9, STEP]) == [1, 4]


def test_rule4_no_end_think_runs_to_the_end():
    assert score_positions([1, THINK, 9, STEP, 9, STEP]) == [2, 4]


def test_no_think_token_scores_the_whole_sequence():
    assert score_positions([9, STEP, 9, STEP]) == [0, 2]
    assert score_positions([9, STEP, 9, STEP], think_start=None, think_end=None) == [0, 2]


def test_several_step_ids_form_one_run():
    ids = [THINK, 9, STEP, 8, 9, 8, STEP]
    assert score_positions(ids, step_ids=(STEP, 8)) == [1, 4]


def test_left_padding_never_creates_or_breaks_a_step():
    pad = 0
    ids = torch.tensor([[pad, pad, STEP, THINK, 9, STEP], [pad, STEP, STEP, 9, 9, STEP]])
    attention = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    mask = sprm_score_mask(sprm_step_token_mask(ids, [STEP], THINK, END_THINK, attention))
    assert mask[0].nonzero().flatten().tolist() == [4]
    # row 1 has no <think>: the first real token is a step with no position before it, so it is dropped
    assert mask[1].nonzero().flatten().tolist() == [4]
    assert not (mask & ~attention.bool()).any()


def test_trajectory_score_is_geometric_mean_and_no_step_is_zero():
    logits = torch.tensor([[0.3, -1.0, 2.0, 5.0], [0.3, -1.0, 2.0, 5.0]])
    mask = torch.tensor([[True, False, True, True], [False, False, False, False]])
    log_scores = sprm_trajectory_log_scores(logits, mask)
    assert math.isclose(log_scores[0].exp().item(), reference_trajectory_score([0.3, 2.0, 5.0]), rel_tol=1e-6)
    assert log_scores[1].item() == float("-inf") and log_scores[1].exp().item() == 0.0


def test_trajectory_score_does_not_underflow_in_bf16_with_2000_steps():
    logits = torch.full((1, 2000), -3.0, dtype=torch.bfloat16)
    mask = torch.ones(1, 2000, dtype=torch.bool)
    score = sprm_trajectory_log_scores(logits, mask).exp().item()
    assert math.isclose(score, 1 / (1 + math.exp(3.0)), rel_tol=1e-3)
    assert score > 0  # the literal product would be 0.047**2000 == 0


# ---------------------------------------------------------------- property test against the reference
token = st.sampled_from([1, 2, 3, STEP, STEP, 8, THINK, END_THINK])


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(st.lists(token, min_size=1, max_size=24), min_size=1, max_size=5),
    step_ids=st.sampled_from([(STEP,), (STEP, 8)]),
    think=st.sampled_from([(THINK, END_THINK), (None, None), (THINK, None), (None, END_THINK)]),
    left_pad=st.booleans(),
)
def test_step_mask_matches_reference(rows, step_ids, think, left_pad):
    width = max(len(r) for r in rows)
    pad = 0
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left_pad else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        attention[i, span] = 1
    ids[attention == 0] = pad
    mask = sprm_score_mask(sprm_step_token_mask(ids, list(step_ids), think[0], think[1], attention))
    for i, row in enumerate(rows):
        offset = width - len(row) if left_pad else 0
        expected = [p + offset for p in reference_score_positions(row, step_ids, think[0], think[1])]
        assert mask[i].nonzero().flatten().tolist() == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=1, max_size=40))
def test_trajectory_score_matches_reference(logits):
    z = torch.tensor([logits], dtype=torch.float64)
    got = sprm_trajectory_log_scores(z, torch.ones_like(z, dtype=torch.bool)).exp().item()
    assert math.isclose(got, reference_trajectory_score(logits), rel_tol=1e-5, abs_tol=1e-300)


# ---------------------------------------------------------------- real traces, real tokenizer
def test_processbench_traces_with_the_real_tokenizer(real_tokenizer, data_dir):
    tok = real_tokenizer
    assert tok.encode(".\n\n", add_special_tokens=False) == [382]
    think, end_think = tok.convert_tokens_to_ids(["<think>", "</think>"])
    assert (think, end_think) == (151648, 151649)
    traces = json.loads((data_dir / "processbench" / "gsm8k.json").read_text())[:60]
    traces += json.loads((data_dir / "processbench" / "math.json").read_text())[:60]
    total_steps = 0
    for trace in traces:
        text = (
            f"{trace['problem']}<think>\n"
            + "\n\n".join(trace["steps"])
            + f"\n</think>\n\n{trace['steps'][-1]}.\n\nDone"
        )
        ids = tok.encode(text, add_special_tokens=False)
        got = score_positions(ids, step_ids=(382,), think_start=think, think_end=end_think)
        assert got == reference_score_positions(ids, (382,), think, end_think)
        # independent check from the definition: first-of-run 382 strictly inside the think span, minus one
        start, end = ids.index(think), len(ids) - 1 - ids[::-1].index(end_think)
        expected = [t - 1 for t in range(start + 2, end) if ids[t] == 382 and ids[t - 1] != 382]
        assert got == expected
        total_steps += len(got)
    assert total_steps > 100  # the traces really contain '.\n\n' steps


def test_processbench_traces_in_paper_mode_mark_every_token_containing_the_step_text(real_tokenizer, data_dir):
    from metastone_hf import MetaStoneConfig

    tok = real_tokenizer
    paper = MetaStoneConfig.sprm_token_ids_from_tokenizer(tok, mode="paper")["step_token_ids"]
    contains_step = {i for i in paper if ".\n\n" in tok.decode([i])}
    assert contains_step == set(paper)
    think, end_think = 151648, 151649
    traces = json.loads((data_dir / "processbench" / "math.json").read_text())[:80]
    beyond_official = 0
    for trace in traces:
        text = f"{trace['problem']}<think>\n" + "\n\n".join(trace["steps"]) + f"\n</think>\n\n{trace['steps'][-1]}"
        ids = tok.encode(text, add_special_tokens=False)
        got = score_positions(ids, step_ids=paper, think_start=think, think_end=end_think)
        assert got == reference_score_positions(ids, paper, think, end_think)
        # From the definition: a token whose text contains '.\n\n', first of its run, inside the think span.
        start, end = ids.index(think), len(ids) - 1 - ids[::-1].index(end_think)
        marks = [tok.decode([i]).count(".\n\n") > 0 for i in ids]
        expected = [t - 1 for t in range(start + 2, end) if marks[t] and not marks[t - 1]]
        assert got == expected
        beyond_official += sum(ids[t + 1] != 382 for t in got)
    assert beyond_official > 0  # the traces contain steps such as ').\n\n' that the official mode misses


# ---------------------------------------------------------------- the incremental form used while decoding
HAND_BUILT = [  # every sequence of the hand-built cases above, with its step ids and think ids
    ([1, THINK, 9, STEP, 9, 8, STEP], (STEP,), THINK, END_THINK),
    ([1, THINK, 9, STEP, STEP, STEP, 9, STEP, STEP], (STEP,), THINK, END_THINK),
    ([1, THINK, STEP, 9, STEP], (STEP,), THINK, END_THINK),
    ([1, THINK, STEP, STEP, 9, STEP], (STEP,), THINK, END_THINK),
    ([9, STEP, 1, THINK, 9, STEP, 9, END_THINK, 9, STEP, END_THINK, 9, STEP], (STEP,), THINK, END_THINK),
    ([THINK, 9, STEP, THINK, 9, STEP], (STEP,), THINK, END_THINK),
    ([1, THINK, 9, STEP, 9, STEP], (STEP,), THINK, END_THINK),
    ([9, STEP, 9, STEP], (STEP,), THINK, END_THINK),
    ([9, STEP, 9, STEP], (STEP,), None, None),
    ([THINK, 9, STEP, 8, 9, 8, STEP], (STEP, 8), THINK, END_THINK),
    ([STEP, THINK, 9, STEP], (STEP,), THINK, END_THINK),
    ([STEP, STEP, 9, 9, STEP], (STEP,), THINK, END_THINK),
]


def assert_incremental_equals_batch_mask(row, step_ids, think_start, think_end, prompt_length=1):
    """Feed ``row`` token by token after a prompt of ``prompt_length`` tokens; compare with the batch mask."""
    ids = torch.tensor([row])
    rule = IncrementalStepRule(
        list(step_ids), think_start, think_end, ids[:, :prompt_length], torch.ones(1, prompt_length)
    )
    for t in range(prompt_length, len(row)):
        candidate, counts = rule.update(ids[:, t])
        prefix = ids[:, : t + 1]
        # `counts` is the step mask of the sequence so far, at its last token ...
        assert counts.tolist() == sprm_step_token_mask(prefix, list(step_ids), think_start, think_end)[:, -1].tolist()
        # ... and `candidate` is the same without the `</think>` span rule, which later tokens may still change.
        assert candidate.tolist() == sprm_step_token_mask(prefix, list(step_ids), think_start, None)[:, -1].tolist()


@pytest.mark.parametrize(("row", "step_ids", "think_start", "think_end"), HAND_BUILT)
def test_incremental_rule_equals_the_mask_on_every_hand_built_case(row, step_ids, think_start, think_end):
    for prompt_length in range(1, len(row)):
        assert_incremental_equals_batch_mask(row, step_ids, think_start, think_end, prompt_length)


@settings(max_examples=300, deadline=None)
@given(
    row=st.lists(token, min_size=2, max_size=24),
    step_ids=st.sampled_from([(STEP,), (STEP, 8)]),
    think=st.sampled_from([(THINK, END_THINK), (None, None), (THINK, None), (None, END_THINK)]),
    prompt_fraction=st.floats(0, 1),
)
def test_incremental_rule_equals_the_mask_on_random_rows(row, step_ids, think, prompt_fraction):
    prompt_length = max(1, min(len(row) - 1, int(prompt_fraction * len(row))))
    assert_incremental_equals_batch_mask(row, step_ids, think[0], think[1], prompt_length)


def test_incremental_rule_with_left_padded_prompts_and_selected_rows():
    pad = 0
    prompts = torch.tensor([[pad, pad, THINK, 9], [1, THINK, 9, STEP]])
    attention = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    rule = IncrementalStepRule([STEP], THINK, END_THINK, prompts, attention)
    rule.select(torch.tensor([1, 0, 0]))  # rows repeat and reorder as a search expands them
    candidate, counts = rule.update(torch.tensor([STEP, STEP, 9]))
    assert candidate.tolist() == [False, True, False]  # row 0 continues a run of step tokens
    assert counts.tolist() == [False, True, False]


def test_scoring_primitives_check_shapes():
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="differs from `input_ids` shape"):
        sprm_step_token_mask(ids, [STEP], THINK, END_THINK, torch.ones(2, 4))
    with pytest.raises(ValueError, match="must have one shape"):
        sprm_trajectory_log_scores(torch.zeros(2, 5), torch.zeros(2, 4, dtype=torch.bool))
