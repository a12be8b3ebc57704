"""Adaptive test-time compute (``generate(..., adaptive=...)``): warm-up threshold, early stopping, consensus.

References are computed independently from what the output reports (numpy's percentile, a plain sliding-window
minimum over the returned step scores, a slow replay of the consensus rule), never from the engine's own state.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import END_THINK, STEP, THINK
from test_generation_metastone import EOS, PAD, PROMPTS, DigitTokenizer, assert_online_equals_offline, digit_answers

from metastone_hf import AdaptiveConfig, SearchConfig
from metastone_hf.adaptive_metastone import lowest_window_mean, percentile, token_confidence, vote_share
from metastone_hf.tiny import tiny_metastone

# Steps and EOS frequent (trajectories of different lengths and step counts); no think tokens, so the steps that
# count while sampling are the steps of the final mask.
SETTINGS = {
    "sequence_bias": {(STEP,): 1.5, (EOS,): 1.0},
    "suppress_tokens": [THINK, END_THINK],
    "eos_token_id": EOS,
    "pad_token_id": PAD,
    "max_new_tokens": 30,
    "progress_bar": False,
}
SEEDS = [1, 2]


@pytest.fixture(scope="module")
def model():
    return tiny_metastone(seed=31)


def generate(model, prompts=None, seeds=SEEDS, n=8, **options):
    ids, mask = PROMPTS if prompts is None else prompts
    return model.generate(
        ids, attention_mask=mask, num_candidates=n, seed=seeds, tokenizer=DigitTokenizer(), **{**SETTINGS, **options}
    )


WIDTH = PROMPTS[0].shape[1]  # the prompts' padded width (the same for one prompt alone: both are left padded to it)


def generated(out, b, j):
    """Candidate ``j`` of prompt ``b``: its real generated tokens."""
    return out.candidates[b, j, WIDTH : WIDTH + int(out.num_generated_tokens[b, j])]


def reference_statistic(out, b, j, window):
    """Lowest sliding-window mean of the candidate's generated steps' log scores, from the returned step scores."""
    generated_steps = out.step_positions[b][j] >= WIDTH - 1  # a prompt step is scored before the prompt's end
    return lowest_window_mean(torch.log(out.step_scores[b][j][generated_steps].double()).tolist(), window)


# ----------------------------------------------------------------------------------- off by default


def test_adaptivity_off_is_best_of_n_sample_for_sample(model):
    plain = generate(model)
    off = generate(model, adaptive=None)
    for name in ("candidates", "scores", "chosen_index", "pruned", "num_generated_tokens"):
        assert torch.equal(getattr(plain, name), getattr(off, name)), name
    assert off.used is None and off.adaptive_threshold is None
    assert SearchConfig().adaptive is None


def test_adaptive_that_never_adapts_reproduces_best_of_n(model):
    # Every candidate in the warm-up, no threshold, no consensus: the same N candidates as plain Best-of-N.
    plain = generate(model)
    never = generate(model, adaptive=AdaptiveConfig(warmup=8, keep_percent=100, consensus=None))
    assert torch.equal(never.candidates, plain.candidates)
    assert torch.equal(never.chosen_index, plain.chosen_index)
    assert (never.scores - plain.scores).abs().max() <= 1e-6
    assert bool(never.used.all()) and not bool(never.pruned.any())
    assert never.tokens_generated == plain.tokens_generated


# ----------------------------------------------------------------------------------- threshold and stopping


@pytest.mark.parametrize("window", [1, 2])
def test_threshold_is_the_percentile_of_the_warmup_candidates_only(model, window):
    warmup, keep = 4, 60.0
    out = generate(model, n=8, adaptive=AdaptiveConfig(warmup=warmup, keep_percent=keep, window=window, consensus=None))
    assert_online_equals_offline(model, out)
    changed = False
    for b in range(2):
        stats = [reference_statistic(out, b, j, window) for j in range(8)]
        for j in range(8):  # the reported statistic is the candidate's lowest window mean of its log step scores
            got = float(out.adaptive_statistic[b, j])
            assert (math.isinf(got) and math.isinf(stats[j])) or abs(got - stats[j]) <= 1e-5, (b, j, got, stats[j])
        warm = np.array(stats[:warmup])
        expected = float(np.percentile(warm, 100 - keep)) if np.isfinite(warm).all() else percentile(warm, 100 - keep)
        assert float(out.adaptive_threshold[b]) == pytest.approx(expected, abs=1e-5)
        everything = percentile([s for s, used in zip(stats, out.used[b].tolist()) if used], 100 - keep)
        changed |= everything != expected and abs(everything - expected) > 1e-6
        # Warm-up candidates are never stopped; later ones are stopped exactly when they end below the threshold.
        assert not bool(out.pruned[b, :warmup].any())
        for j in range(warmup, 8):
            assert bool(out.pruned[b, j]) == (stats[j] < float(out.adaptive_threshold[b])), (b, j)
    assert changed, "the later candidates should have moved the percentile (the test would not discriminate)"


def test_threshold_floor_raises_a_low_warmup_percentile(model):
    # keep_percent=100: the warm-up sets no threshold, so the floor alone is the later candidates' threshold; with a
    # percentile, the threshold is the larger of the two.
    warmup = 3
    plain = generate(model, n=8, adaptive=AdaptiveConfig(warmup=warmup, keep_percent=40.0, consensus=None))
    unstopped = generate(model, n=8, adaptive=AdaptiveConfig(warmup=warmup, keep_percent=100.0, consensus=None))
    for b in range(2):
        stats = [reference_statistic(unstopped, b, j, 1) for j in range(8)]  # every candidate run to its end
        later = sorted(s for s in stats[warmup:] if math.isfinite(s))
        middle = len(later) // 2
        floor = (later[middle - 1] + later[middle]) / 2  # between two candidates (no float32 tie): stops about half
        for keep, expected in ((100.0, floor), (40.0, max(floor, float(plain.adaptive_threshold[b])))):
            out = generate(
                model,
                n=8,
                adaptive=AdaptiveConfig(warmup=warmup, keep_percent=keep, consensus=None, threshold_floor=floor),
            )
            assert float(out.adaptive_threshold[b]) == pytest.approx(expected, abs=1e-6)
            assert not bool(out.pruned[b, :warmup].any())  # the warm-up runs to its end, floor or not
            got = [reference_statistic(out, b, j, 1) for j in range(8)]
            for j in range(warmup, 8):
                assert bool(out.pruned[b, j]) == (got[j] < expected), (b, keep, j)
            if keep == 100.0:  # the floor alone stops some later candidates, not all (the test discriminates)
                assert bool(out.pruned[b, warmup:].any()) and not bool(out.pruned[b, warmup:].all())
    with pytest.raises(ValueError, match="threshold_floor"):
        generate(model, adaptive=AdaptiveConfig(threshold_floor=float("nan")))


@pytest.mark.parametrize("signal", ["sprm", "confidence"])
def test_stopped_candidates_are_never_chosen_over_finished_ones(model, signal):
    # A selection that takes the last candidate it is offered: were stopped candidates offered, a stopped last
    # candidate would win.
    last = lambda scores, answers: len(scores) - 1  # noqa: E731
    window = 1 if signal == "sprm" else 4
    seen_stopped_last = False
    for seed in range(6):
        out = generate(
            model, seeds=[seed, seed + 10], selection=last,
            adaptive=AdaptiveConfig(signal=signal, warmup=3, keep_percent=50, window=window, consensus=None),
        )  # fmt: skip
        for b in range(2):
            finished = [j for j in range(8) if bool(out.used[b, j]) and not bool(out.pruned[b, j])]
            if signal == "confidence":  # DeepConf also leaves warm-up candidates below the threshold out
                bar = float(out.adaptive_threshold[b])
                finished = [j for j in finished if float(out.adaptive_statistic[b, j]) >= bar] or finished
            assert finished and int(out.chosen_index[b]) == finished[-1]
            seen_stopped_last |= bool(out.pruned[b, 7])
    assert seen_stopped_last, "the last candidate should have been stopped somewhere (the test would not discriminate)"


def test_stopped_candidates_keep_their_tokens_and_decode_steps(model):
    out = generate(model, adaptive=AdaptiveConfig(warmup=3, keep_percent=90, consensus=None))
    assert bool(out.pruned.any())
    assert int(out.num_generated_tokens.sum()) == out.tokens_generated
    per_candidate = out.num_generated_tokens.masked_fill(~out.used, 0)
    assert (per_candidate[out.pruned & out.used] > 0).all()
    # A prompt decodes at least as many steps as its longest candidate, at most the sum of its candidates' tokens.
    assert (out.prompt_decode_steps >= per_candidate.max(dim=1).values).all()
    assert (out.prompt_decode_steps <= per_candidate.sum(dim=1)).all()


# ----------------------------------------------------------------------------------- consensus


def replay_consensus(out, b, warmup, tau, answers):
    """A slow, obvious replay for ``parallel=1``: after the warm-up and after each later candidate, the vote share
    of the finished (not stopped) candidates so far, weighted by their scores."""
    n = out.candidates.shape[1]
    for used in range(warmup, n + 1):
        voters = [j for j in range(used) if not bool(out.pruned[b, j])]
        totals: dict = {}
        for j in voters:
            if answers[b][j] is not None:
                totals[answers[b][j]] = totals.get(answers[b][j], 0.0) + float(out.scores[b, j])
        if totals and max(totals.values()) / sum(totals.values()) >= tau:
            return used
    return n


@pytest.mark.parametrize("tau", [0.5, 0.7])
def test_consensus_stop_matches_a_slow_replay(model, tau):
    warmup = 2
    config = AdaptiveConfig(warmup=warmup, keep_percent=90, consensus=tau, parallel=1)
    stopped_early = False
    for seed in range(4):
        out = generate(model, seeds=[seed, seed + 7], adaptive=config)
        answers = digit_answers(out)
        for b in range(2):
            used = int(out.used[b].sum())
            assert used == replay_consensus(out, b, warmup, tau, answers), (seed, b)
            assert bool(out.used[b, :used].all()) and not bool(out.used[b, used:].any())  # candidates 0..used-1
            stopped_early |= used < 8
    assert stopped_early


def test_consensus_by_score_and_cancelled_candidates(model):
    config = AdaptiveConfig(warmup=2, keep_percent=100, consensus=0.5, consensus_by="score", parallel=3)
    out = generate(model, adaptive=config)
    for b in range(2):
        used = out.used[b]
        finished = used & ~out.pruned[b]
        assert bool(finished.any())
        if int(used.sum()) < 8:  # stopped on its consensus: some finished candidate scored at least 0.5
            assert float(out.scores[b][finished].max()) >= 0.5 - 1e-6
        assert int(out.chosen_index[b]) in finished.nonzero().flatten().tolist()


# ----------------------------------------------------------------------------------- batch invariance


@pytest.mark.parametrize(
    "config",
    [
        AdaptiveConfig(warmup=3, keep_percent=70, consensus=0.6),
        AdaptiveConfig(signal="confidence", warmup=3, window=4, keep_percent=70, consensus=0.6, parallel=2),
    ],
)
def test_records_are_batch_invariant(model, config):
    ids, mask = PROMPTS
    batched = generate(model, adaptive=config)
    capped = generate(model, adaptive=config, max_active_rows=3)  # one prompt at a time
    for b in range(2):
        alone = generate(model, prompts=(ids[b : b + 1], mask[b : b + 1]), seeds=[SEEDS[b]], adaptive=config)
        for out in (batched, capped):
            for name in ("used", "pruned", "num_generated_tokens", "prompt_decode_steps", "chosen_index"):
                assert torch.equal(getattr(out, name)[b], getattr(alone, name)[0]), (name, b)
            for j in range(8):
                assert torch.equal(generated(out, b, j), generated(alone, 0, j)), (b, j)
            assert torch.allclose(out.adaptive_statistic[b], alone.adaptive_statistic[0], equal_nan=True, atol=1e-5)
            assert float(out.adaptive_threshold[b]) == pytest.approx(float(alone.adaptive_threshold[0]), abs=1e-5)


def test_streamed_outputs_equal_the_batch(model):
    config = AdaptiveConfig(warmup=3, keep_percent=70, consensus=0.6)
    batched = generate(model, adaptive=config)
    streamed = dict(generate(model, adaptive=config, stream=True))
    for b, one in streamed.items():
        assert torch.equal(one.used[0], batched.used[b]) and torch.equal(one.pruned[0], batched.pruned[b])
        assert int(one.chosen_index[0]) == int(batched.chosen_index[b])


# ----------------------------------------------------------------------------------- the confidence signal


def test_token_confidence_is_deepconfs_definition():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    probs = torch.softmax(logits, dim=-1)
    expected = [-sum(math.log(p) for p in sorted(row.tolist(), reverse=True)[:2]) / 2 for row in probs]
    assert torch.allclose(token_confidence(logits, 2), torch.tensor(expected), atol=1e-6)
    assert vote_share(["a", "b", None, "a"], [1.0, 2.0, 5.0, 1.0]) == pytest.approx(0.5)
    assert vote_share([None], [1.0]) == 0.0


def test_confidence_statistic_equals_a_full_forward_reference(model):
    # The processed distribution without truncation: sequence bias and suppressed tokens, then the temperature; top-p
    # (which would put -inf on the tail) left out. Recomputed with one plain forward over each returned candidate.
    temperature, top_k, window = 0.7, 20, 4
    config = AdaptiveConfig(signal="confidence", warmup=4, window=window, keep_percent=100, consensus=None)
    out = generate(model, n=4, adaptive=config, temperature=temperature, top_p=0.9, do_sample=True)
    for b in range(2):
        for j in range(4):
            n = int(out.num_generated_tokens[b, j])
            ids = out.candidates[b, j, : WIDTH + n][None]
            mask = out.candidate_attention_mask[b, j, : WIDTH + n][None]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[0].double()
            logits = logits[WIDTH - 1 : WIDTH - 1 + n]  # the distributions each generated token was sampled from
            logits[:, STEP] += 1.5
            logits[:, EOS] += 1.0
            logits[:, [THINK, END_THINK]] = -math.inf
            log_probs = torch.log_softmax(logits / temperature, dim=-1)
            confidences = (-log_probs.topk(top_k, dim=-1).values.mean(dim=-1)).tolist()
            expected = lowest_window_mean(confidences, window)
            assert float(out.adaptive_statistic[b, j]) == pytest.approx(expected, abs=1e-4), (b, j)


# ----------------------------------------------------------------------------------- settings


def test_settings_are_checked(model):
    with pytest.raises(ValueError, match="best_of_n"):
        generate(model, search="beam", beam_width=2, adaptive="sprm")
    with pytest.raises(ValueError, match="warmup"):
        generate(model, n=4, adaptive=AdaptiveConfig(warmup=5))
    with pytest.raises(ValueError, match="pruning"):
        generate(model, adaptive="sprm", prune_top_k=2)
    with pytest.raises(ValueError, match="score"):
        generate(model, adaptive=AdaptiveConfig(signal="confidence", consensus_by="score"))
    ids, mask = PROMPTS
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(ids, attention_mask=mask, num_candidates=4, adaptive="sprm", **SETTINGS)


@pytest.mark.parametrize("window", [1, 3, 5])
def test_the_device_statistic_equals_a_plain_sliding_window_minimum(window):
    from metastone_hf.adaptive_metastone import SignalState

    generator = torch.Generator().manual_seed(window)
    rows, steps = 6, 20
    values = torch.randn(steps, rows, generator=generator)
    take = torch.rand(steps, rows, generator=generator) < 0.6
    state = SignalState(window)
    signal = state.fresh(rows, torch.device("cpu"))
    for t in range(steps):
        signal = state.update(signal, values[t], take[t])
    for r in range(rows):
        taken = [float(v) for v, k in zip(values[:, r], take[:, r]) if k]
        expected = lowest_window_mean(taken, window)
        got = float(state.statistic(signal)[r])
        assert (math.isinf(expected) and math.isinf(got)) or got == pytest.approx(expected, abs=1e-5)


def test_percentile_is_numpys_and_parse_adaptive_reads_the_cli_syntax():
    from metastone_hf.eval_runner import parse_adaptive

    values = [0.3, -1.0, 2.5, 0.7, 1.1]
    for q in (0, 10, 37.5, 50, 90, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([-math.inf, 1.0, 2.0], 10) == -math.inf
    name, fields = parse_adaptive("confidence:warmup=8,keep_percent=10,consensus=none,window=64")
    assert name == "confidence:warmup=8,keep_percent=10,consensus=none,window=64"
    assert fields == {"signal": "confidence", "warmup": 8, "keep_percent": 10.0, "consensus": None, "window": 64}
    assert parse_adaptive("sprm:threshold_floor=-0.0027,consensus_by=score")[1] == {
        "signal": "sprm", "threshold_floor": -0.0027, "consensus_by": "score"
    }  # fmt: skip
    for bad in ("sprm:warmpu=2", "sprm:warmup=two", "spam", "sprm:keep_percent=0", "sprm:threshold_floor=inf"):
        with pytest.raises(ValueError):
            parse_adaptive(bad)
