"""Row-wise sampling: several prompts in one search call under the paper's protocol, processors per row.

References: transformers' own processors built for one row alone (``_get_logits_processor``), transformers' own
``generate(num_return_sequences=N)``, and one search call per prompt.
"""

from __future__ import annotations

import pytest
import torch
from conftest import STEP, THINK
from test_generation_metastone import EOS, PAD, assert_online_equals_offline, left_padded
from test_modeling_metastone import plain_twin
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria

from metastone_hf.sampling_metastone import RowwiseSampler, check_prompt_seeds
from metastone_hf.tiny import tiny_metastone

PAPER = {"temperature": 0.6, "top_p": 0.95, "top_k": 0, "repetition_penalty": 1.05}
# Steps and EOS frequent enough that a random tiny model's trajectories stop, branch and differ in length.
STEPPY = {"sequence_bias": {(STEP,): 2.5, (EOS,): 0.5}, "pad_token_id": PAD, "eos_token_id": EOS}
QUESTIONS = [
    [1, THINK, 9, 10, STEP, 11],
    [1, 2, 3, THINK, 12, 13, 14, STEP, 15],
    [2, THINK, 16],
]


@pytest.fixture(scope="module")
def model():
    return tiny_metastone(seed=41)


def generated_part(out, b: int, j: int) -> list[int]:
    """Candidate ``j`` of prompt ``b``: its generated tokens (the prompt and the trailing padding removed)."""
    n = int(out.num_generated_tokens[b, j])
    real = out.candidates[b, j][out.candidate_attention_mask[b, j].bool()]
    return real[len(real) - n :].tolist()


@pytest.mark.parametrize("search", ["best_of_n", "beam", "dvts"])
@pytest.mark.parametrize("num_prompts", [1, 2, 3])
def test_batched_prompts_equal_one_call_per_prompt_under_the_paper_protocol(model, search, num_prompts):
    questions = QUESTIONS[:num_prompts]
    seeds = [100 + 7 * b for b in range(num_prompts)]
    kwargs = {**PAPER, **STEPPY, "max_new_tokens": 14, "num_candidates": 4, "search": search, "progress_bar": False}
    if search != "best_of_n":
        kwargs["beam_width"] = 2
    ids, mask = left_padded(questions)
    batched = model.generate(ids, attention_mask=mask, seed=seeds, **kwargs)
    assert batched.candidates.shape[:2] == (num_prompts, 4)
    assert_online_equals_offline(model, batched)
    for b, question in enumerate(questions):
        alone = model.generate(torch.tensor([question]), seed=seeds[b], **kwargs)
        for j in range(4):
            assert generated_part(batched, b, j) == generated_part(alone, 0, j), (b, j)
        torch.testing.assert_close(batched.scores[b], alone.scores[0], atol=1e-4, rtol=0)
        assert int(batched.chosen_index[b]) == int(alone.chosen_index[0])


def test_repetition_penalised_best_of_n_equals_transformers_sample_for_sample(model):
    twin = plain_twin(model)
    ids, mask = left_padded(QUESTIONS)
    kwargs = {**PAPER, **STEPPY, "max_new_tokens": 16, "no_repeat_ngram_size": 3, "min_new_tokens": 3}
    torch.manual_seed(5)
    expected = twin.generate(ids, attention_mask=mask, do_sample=True, num_return_sequences=4, **kwargs)
    out = model.generate(ids, attention_mask=mask, num_candidates=4, seed=5, progress_bar=False, **kwargs)
    width = min(out.candidates.shape[-1], expected.shape[-1])
    got = out.candidates.flatten(0, 1)
    # Rows stop at EOS in both; transformers pads them up to its longest row, we up to ours (the same one).
    assert got.shape == expected.shape
    assert torch.equal(got[:, :width], expected[:, :width])
    assert bool((out.num_generated_tokens >= 3).all())  # min_new_tokens held for every row


# ---------------------------------------------------------------------------------- processors see each row alone


class StopAfterOwnLength(StoppingCriteria):
    """Stops a row once it holds ``length`` tokens of its own, or its last token is ``token``."""

    def __init__(self, length: int, token: int):
        self.length, self.token = length, token

    def __call__(self, input_ids, scores, **kwargs):
        own = torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length)
        return own | (input_ids[:, -1] == self.token)


def test_rowwise_processors_equal_processors_built_for_each_row_alone(model):
    """Merged rows of different lengths: each row's processed logits are what transformers computes for it alone."""
    ids, mask = left_padded(QUESTIONS)
    prompt_length = ids.shape[1]
    config = GenerationConfig(
        do_sample=True,
        **PAPER,
        min_new_tokens=4,
        no_repeat_ngram_size=2,
        exponential_decay_length_penalty=(2, 1.3),
        sequence_bias={(STEP,): 1.5, (3, 4): -2.0},
        eos_token_id=EOS,
        pad_token_id=PAD,
    )

    model._prepare_special_tokens(config, kwargs_has_attention_mask=True, device="cpu")

    def processors_for(prompt_ids, prompt_mask):
        return model._get_logits_processor(
            config,
            input_ids_seq_length=prompt_ids.shape[1],
            encoder_input_ids=prompt_ids,
            logits_processor=LogitsProcessorList(),
            device="cpu",
            model_kwargs={"attention_mask": prompt_mask},
        )

    generator = torch.Generator().manual_seed(0)
    prompt = torch.tensor([0, 2, 1, 1, 0, 2, 0])
    generated = torch.tensor([0, 5, 2, 7, 7, 1, 3])
    vocab = model.config.get_text_config().vocab_size
    own_rows = []
    for p, g in zip(prompt.tolist(), generated.tolist()):
        tail = torch.randint(1, vocab, (g,), generator=generator)
        tail[::3] = 3  # repeats, so the penalty and the n-gram ban have something to act on
        own_rows.append(torch.cat([ids[p], tail]))
    width = max(len(r) for r in own_rows)
    buffer = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in own_rows])
    logits = torch.randn(len(own_rows), vocab, generator=generator)
    alive = torch.ones(len(own_rows), dtype=torch.bool)
    alive[4] = False  # a dead row is left alone

    criteria = [StopAfterOwnLength(prompt_length + 5, 3)]
    sampler = RowwiseSampler(processors_for(ids, mask), criteria, prompt_length, len(QUESTIONS))
    processed = sampler.process(buffer, logits.clone(), prompt, generated, alive)
    stopped = sampler.stopped(buffer, prompt, generated, alive)
    for i, row in enumerate(own_rows):
        p = int(prompt[i])
        if not bool(alive[i]):
            assert torch.equal(processed[i], logits[i]) and not bool(stopped[i])
            continue
        alone = processors_for(ids[p : p + 1], mask[p : p + 1])(row[None], logits[i : i + 1].clone())
        torch.testing.assert_close(processed[i], alone[0], rtol=0, atol=0)
        assert bool(stopped[i]) == bool(criteria[0](row[None], None)[0])


def test_prefix_allowed_tokens_fn_gets_each_rows_prompt(model):
    ids, mask = left_padded(QUESTIONS)
    seen = []

    def allowed(batch_id, tokens):
        seen.append(batch_id)
        return [EOS, 20 + batch_id]  # prompt b may only write 20 + b, then stop

    out = model.generate(
        ids, attention_mask=mask, num_candidates=3, seed=1, max_new_tokens=4, progress_bar=False,
        prefix_allowed_tokens_fn=allowed, **STEPPY,
    )  # fmt: skip
    assert set(seen) == {0, 1, 2}
    for b in range(3):
        for j in range(3):
            assert set(generated_part(out, b, j)) <= {EOS, 20 + b}


def test_processors_that_cannot_be_applied_row_by_row_are_refused(model):
    ids, mask = left_padded(QUESTIONS[:2])
    with pytest.raises(ValueError, match="classifier-free guidance"):
        model.generate(ids, attention_mask=mask, num_candidates=2, guidance_scale=1.5, max_new_tokens=3)


def test_prompt_seeds_are_checked():
    assert check_prompt_seeds(None, 2) is None and check_prompt_seeds(3, 2) is None
    assert check_prompt_seeds([1, 2], 2) == [1, 2]
    for bad in ([1], [1, 2.0], "12", [True, 1]):
        with pytest.raises(ValueError, match="one int per prompt|must be an int"):
            check_prompt_seeds(bad, 2)


@pytest.mark.parametrize("search", ["beam", "dvts"])
def test_stop_strings_in_step_search_batched_equal_one_call_per_prompt(model, search, real_tokenizer):
    stop = real_tokenizer.decode([300])
    assert real_tokenizer.encode(stop, add_special_tokens=False) == [300]
    kwargs = {
        **PAPER, "pad_token_id": PAD, "eos_token_id": EOS, "max_new_tokens": 16, "num_candidates": 4,
        "beam_width": 2, "search": search, "stop_strings": [stop], "tokenizer": real_tokenizer,
        "sequence_bias": {(STEP,): 2.5, (300,): 1.5}, "progress_bar": False,
    }  # fmt: skip
    ids, mask = left_padded(QUESTIONS)
    seeds = [3, 4, 5]
    batched = model.generate(ids, attention_mask=mask, seed=seeds, **kwargs)
    hits = 0
    for b, question in enumerate(QUESTIONS):
        alone = model.generate(torch.tensor([question]), seed=seeds[b], **kwargs)
        for j in range(4):
            tokens = generated_part(batched, b, j)
            assert tokens == generated_part(alone, 0, j)
            if 300 in tokens:
                hits += 1
                assert tokens.index(300) == len(tokens) - 1  # stopped right at the stop string
    assert hits > 0
