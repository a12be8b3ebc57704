"""Continuous batching: prompts admitted into a running decode give what each prompt alone gives.

Three prompts of different lengths, per-prompt seeds, the paper's processors (temperature 0.6, top_p 0.95,
repetition penalty 1.05), ``min_new_tokens`` and a stop string, EOS and steps sampled often (lengths vary, rounds
end at different times): with room for one or two prompts at a time, in a batch or streamed, every strategy returns
each prompt's candidates token for token, with the same scores and pick, as a call with that prompt alone.
"""

from __future__ import annotations

import pytest
import torch

from metastone_hf.tiny import tiny_metastone_for_tokenizer, tiny_tokenizer

N, M = 4, 2
TEXTS = ["what is half of twelve", "how many days are in two weeks and how many hours", "sum"]
SEEDS = [5, 6, 7]


@pytest.fixture(scope="module")
def setup():
    tokenizer = tiny_tokenizer()
    model = tiny_metastone_for_tokenizer(tokenizer, hidden_size=32, num_hidden_layers=2, seed=3).eval()
    step = int(model.config.step_token_ids[0])
    settings = {
        "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 0, "repetition_penalty": 1.05, "min_new_tokens": 3,
        "max_new_tokens": 40, "stop_strings": ["sum"], "tokenizer": tokenizer, "pad_token_id": tokenizer.pad_token_id,
        "sequence_bias": {(step,): 2.5, (tokenizer.eos_token_id,): 1.8},
    }  # fmt: skip
    return tokenizer, model, settings


def generated(out, b: int, j: int) -> list[int]:
    n = int(out.num_generated_tokens[b, j])
    real = out.candidates[b, j][out.candidate_attention_mask[b, j].bool()]
    return real[len(real) - n :].tolist()


def assert_same_prompt(out, b: int, alone) -> None:
    assert [generated(out, b, j) for j in range(N)] == [generated(alone, 0, j) for j in range(N)]
    torch.testing.assert_close(out.scores[b].double(), alone.scores[0].double(), atol=1e-4, rtol=0)
    assert int(out.chosen_index[b]) == int(alone.chosen_index[0])
    shape = [(n.parent, n.round, n.group, n.status, n.end - n.start) for n in out.search_tree[b][1:]]
    assert shape == [(n.parent, n.round, n.group, n.status, n.end - n.start) for n in alone.search_tree[0][1:]]


@pytest.mark.parametrize("search", ["best_of_n", "beam", "dvts"])
def test_admitted_prompts_equal_each_prompt_alone(setup, search):
    tokenizer, model, settings = setup
    options = {"search": search, "num_candidates": N, **({} if search == "best_of_n" else {"beam_width": M})}
    alone = []
    for text, seed in zip(TEXTS, SEEDS):
        ids = tokenizer([text], return_tensors="pt", add_special_tokens=False)
        alone.append(model.generate(**ids, seed=[seed], **options, **settings))
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True, add_special_tokens=False)
    rounds = max(n.round for out in alone for n in out.search_tree[0])
    if search != "best_of_n":
        assert rounds > 1  # the rounds really end at different times
    for capacity in (None, N, 2 * N):
        out = model.generate(**batch, seed=SEEDS, max_active_rows=capacity, **options, **settings)
        for b in range(len(TEXTS)):
            assert_same_prompt(out, b, alone[b])
    streamed = model.generate(**batch, seed=SEEDS, max_active_rows=2 * N, stream=True, **options, **settings)
    seen = []
    for b, out in streamed:
        seen.append(b)
        assert_same_prompt(out, 0, alone[b])
    assert sorted(seen) == [0, 1, 2]


def test_capacity_bounds_the_rows_of_every_decode_step(setup):
    tokenizer, model, settings = setup
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True, add_special_tokens=False)
    rows: list[int] = []
    handle = model.model.register_forward_hook(
        lambda _m, _a, kwargs, _o: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        model.generate(**batch, num_candidates=N, seed=SEEDS, max_active_rows=N, **settings)
        best_of_n, rows[:] = list(rows), []
        model.generate(
            **batch, search="beam", num_candidates=N, beam_width=M, seed=SEEDS, max_active_rows=N, **settings
        )
    finally:
        handle.remove()
    assert max(best_of_n) == N  # Best-of-N: one prompt at a time, its N rows (prefills of one prompt included)
    # Beam search: parked rows do not count against the capacity (a prompt may be admitted while another's rows wait
    # for their round), but each prompt holds at most N rows and at most 2 x capacity / N prompts are in flight.
    assert max(rows) <= 2 * N
    with pytest.raises(ValueError, match="max_active_rows"):
        model.generate(**batch, num_candidates=N, seed=SEEDS, max_active_rows=0, **settings)


def test_eval_records_under_continuous_admission_equal_batch_size_one(setup):
    from metastone_hf.eval_runner import EvalPlan, question_records
    from metastone_hf.evaluation import EVAL_PROTOCOLS, EvalExample, resolve_protocol

    tokenizer, model, settings = setup
    questions = [*TEXTS, "how many feet are in three yards", "add"]
    examples = [EvalExample(q, "2", str(i)) for i, q in enumerate(questions)]
    protocol, _ = resolve_protocol(EVAL_PROTOCOLS["paper"], max_new_tokens=40)
    plan = EvalPlan(protocol, N, {str(N): N}, ("best_of_n", "beam", "dvts"), beam_width=M, seed=3)
    extra = {k: settings[k] for k in ("min_new_tokens", "stop_strings", "tokenizer", "sequence_bias")}

    def records(batch_size: int, searches=plan.searches):
        one = EvalPlan(protocol, N, {str(N): N}, searches, beam_width=M, seed=3)
        return list(
            question_records(
                model, tokenizer, examples, range(len(examples)), one, prompt_builder=lambda q: q,
                batch_size=batch_size, progress_bar=False, generate_kwargs=extra,
            )
        )  # fmt: skip

    def assert_same(got, expected):
        assert [r["index"] for r in got] == list(range(len(examples)))
        for a, b in zip(got, expected):
            assert a["results"].keys() == b["results"].keys()
            for key, x in a["results"].items():
                y = b["results"][key]
                assert (x["completions"], x["tokens"], x["chosen"], x["tokens_generated"]) == (
                    y["completions"], y["tokens"], y["chosen"], y["tokens_generated"],
                ), key  # fmt: skip
                assert max(abs(p - q) for p, q in zip(x["scores"], y["scores"])) <= 1e-4

    reference = records(1)
    lengths = {len(c) for r in reference for x in r["results"].values() for c in x["completions"]}
    assert len(lengths) > 3  # candidates of many lengths: questions finish at different times
    for batch_size in (2, 3):
        got = records(batch_size)
        assert_same(got, reference)
        decode = [r["decode"] for r in got]
        assert all(d["capacity"] == batch_size * N for d in decode)
        assert sum(d["rows"] for d in decode) / sum(d["steps"] for d in decode) <= batch_size * N
    for search in plan.searches:  # one strategy alone: one continuous stream over every question
        assert_same(records(3, (search,)), [{**r, "results": {k: v for k, v in r["results"].items() if
                                                                k.startswith(search)}} for r in reference])  # fmt: skip
