"""`metastone demo --task long`: the long task checked against references computed here from the prompt text alone.

Every expectation below is derived independently of `demo.task`'s own bookkeeping: the facts and the start are
parsed from the prompt string, the chain is followed by hand, and teacher completions are parsed with a regex of
their own, so a wrong `Problem.answer`, teacher or classifier is caught rather than echoed.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re

import pytest
from conftest import demo_completion_steps

from metastone_hf.cli import main
from metastone_hf.demo import pipeline, task

LONG = task.get_task("long")
E = task.LONG_TEACHER_ERROR_RATE
STEP = re.compile(r"([a-h])>\1\((new|old)\)\1([:~])([a-h])\(\2\)")


def parse_prompt(prompt: str) -> tuple[dict, dict, str]:
    """(current successor, stale successor, start) read from the prompt string."""
    facts, question = prompt.rsplit(" ?", 1)
    current, stale = {}, {}
    for fact in facts.split(" "):
        key, sep, value = fact[0], fact[1], fact[2]
        assert len(fact) == 3 and sep in ":~"
        (current if sep == ":" else stale).setdefault(key, []).append(value)
    return {k: v[0] for k, v in current.items()}, {k: v[0] for k, v in stale.items()}, question


def walk(successor: dict, node: str, edges: int) -> str:
    for _ in range(edges):
        node = successor[node]
    return node


def parse_steps(completion: str) -> list[tuple[str, str, str, str]]:
    """The steps of a well-formed completion as (node, tag, sep, value), by a regex independent of the task's."""
    return demo_completion_steps(completion, STEP)


def hand_completion(current: dict, stale: dict, start: str, stale_at: set, hops: int) -> tuple[str, str]:
    """A completion written by hand that follows the stale fact at the steps in ``stale_at``; returns it and its end."""
    node, text = start, ""
    for hop in range(hops):
        old = hop in stale_at
        value, sep, tag = (stale[node], "~", "(old)") if old else (current[node], ":", "(new)")
        text += f"{node}>{node}{tag}{node}{sep}{value}{tag}.\n\n"
        node = value
    return f"<think>{text}</think>\\boxed{{{node}}}", node


def test_long_problems_every_node_has_a_stale_fact_that_skips_one_node():
    for problem in LONG.make_split("train", 300):
        current, stale, start = parse_prompt(problem.prompt)
        assert set(current) == set(stale) == set(task.NODES)  # every node: one current, one stale fact
        assert len(problem.prompt.split(" ")) == 2 * len(task.NODES) + 1
        assert {walk(current, "a", k) for k in range(8)} == set(task.NODES)  # one 8-cycle
        assert all(stale[x] == current[current[x]] for x in task.NODES)  # the stale fact skips exactly one node
        assert start == problem.start and problem.hops == task.LONG_HOPS == 7
        assert problem.answer == walk(current, start, 7)


def test_splits_are_disjoint_and_deterministic():
    train = {p.prompt for p in LONG.make_split("train", 1000)}
    test = [p.prompt for p in LONG.make_split("test", 200)]
    assert not train & set(test) and len(set(test)) == 200
    assert [p.prompt for p in LONG.make_split("test", 200)] == test


def test_teacher_error_rate_per_step_matches_the_configured_rate_and_steps_are_independent():
    rng, samples = random.Random(0), 3000
    stale_flags = []
    for problem in LONG.make_split("train", samples, seed=3):
        steps = parse_steps(LONG.teacher_completion(problem, rng))
        assert len(steps) == 7
        flags = [tag == "old" for _, tag, _, _ in steps]
        assert flags == [sep == "~" for _, _, sep, _ in steps]
        stale_flags.append(flags)
    total = samples * 7
    rate = sum(map(sum, stale_flags)) / total
    assert abs(rate - E) < 4 * math.sqrt(E * (1 - E) / total)  # 0.3 +- 0.013
    for hop in range(7):  # the same rate at every step
        at = sum(flags[hop] for flags in stale_flags) / samples
        assert abs(at - E) < 4 * math.sqrt(E * (1 - E) / samples), hop
    # independence: an error at one step does not change the rate at the next
    after_error = [flags[h + 1] for flags in stale_flags for h in range(6) if flags[h]]
    assert abs(sum(after_error) / len(after_error) - E) < 4 * math.sqrt(E * (1 - E) / len(after_error))
    perfect = LONG.teacher_completion(LONG.make_problem(11), rng, rates=(0.0,))
    assert all(tag == "new" for _, tag, _, _ in parse_steps(perfect))


def test_errors_compound_all_correct_is_one_minus_e_to_the_hops():
    rng, samples = random.Random(1), 6000
    right, counts = 0, [0] * 8
    for problem in LONG.make_split("train", samples, seed=4):
        completion = LONG.teacher_completion(problem, rng)
        current, _, start = parse_prompt(problem.prompt)
        skips = sum(tag == "old" for _, tag, _, _ in parse_steps(completion))
        counts[skips] += 1
        # k stale steps end k nodes further along the cycle, so only an error-free trajectory is right
        assert task.extract_answer(completion) == walk(current, start, 7 + skips)
        right += task.reward(completion, walk(current, start, 7))
        assert (task.reward(completion, problem.answer) == 1.0) == (skips == 0)
    expected = (1 - E) ** 7  # 0.082
    assert abs(right / samples - expected) < 4 * math.sqrt(expected * (1 - expected) / samples)
    for k, count in enumerate(counts):  # the number of errors is Binomial(7, e)
        p = math.comb(7, k) * E**k * (1 - E) ** (7 - k)
        assert abs(count / samples - p) < 4 * math.sqrt(p * (1 - p) / samples) + 1e-3, k
    # the wrong answers spread over several nodes: the most common wrong answer (2 skips) is not a majority
    assert max(counts[1:]) / samples < 0.35


def test_every_wrong_step_is_detected_by_classify_errors():
    problem = LONG.make_problem(12345)
    current, stale, start = parse_prompt(problem.prompt)
    for size in range(8):
        for stale_at in itertools.combinations(range(7), size):
            completion, end = hand_completion(current, stale, start, set(stale_at), 7)
            errors = task.classify_errors(problem, completion)
            assert errors == (["stale"] if stale_at else []), stale_at
            assert task.extract_answer(completion) == end
            assert task.reward(completion, problem.answer) == (0.0 if stale_at else 1.0)
    # other slips, each at one step of an otherwise correct trajectory
    good, _ = hand_completion(current, stale, start, set(), 7)
    steps = good.split("<think>")[1].split("</think>")[0].split(".\n\n")[:-1]
    x = steps[3][0]
    invented = current[current[current[x]]]  # x:succ^3(x) is listed nowhere
    broken = {
        "misread": f"{x}>{x}(new){x}:{invented}(new)",
        "mistagged": f"{x}>{x}(new){x}~{stale[x]}(new)",
        "jump": f"{current[x]}>{current[x]}(new){current[x]}:{current[current[x]]}(new)",
    }
    for error, step in broken.items():
        text = "<think>" + ".\n\n".join([*steps[:3], step, *steps[4:]]) + ".\n\n</think>\\boxed{" + problem.answer + "}"
        assert error in task.classify_errors(problem, text), error
    six = "<think>" + "".join(s + ".\n\n" for s in steps[:6]) + "</think>\\boxed{" + walk(current, start, 6) + "}"
    assert task.classify_errors(problem, six) == ["hops"]
    teacher_kinds = {
        tuple(task.classify_errors(p, LONG.teacher_completion(p, random.Random(p.uid))))
        for p in LONG.make_split("train", 300)
    }
    assert teacher_kinds == {(), ("stale",)}


def test_answer_extraction_on_long_completions():
    problem = LONG.make_problem(7)
    current, stale, start = parse_prompt(problem.prompt)
    completion, end = hand_completion(current, stale, start, set(), 7)
    assert task.extract_answer(completion) == end == problem.answer
    assert task.extract_answer(completion.replace("</think>", "")) is None  # no think end: no answer
    assert task.extract_answer(completion + "\\boxed{z}") == "z"  # the last box after </think>
    assert task.reward_fn([completion, [{"role": "assistant", "content": completion}]], [end, end]) == [1.0, 1.0]


def test_long_completions_fit_the_model_and_the_budget():
    tokenizer = task.build_tokenizer()
    config = pipeline.DemoConfig.for_task("long")
    longest = 0
    for problem in LONG.make_split("test", 50):
        completion = LONG.teacher_completion(problem, random.Random(problem.uid)) + tokenizer.eos_token
        ids = tokenizer.encode(completion, add_special_tokens=False)
        assert tokenizer.decode(ids) == completion and tokenizer.unk_token_id not in ids
        assert len(ids) == 1 + 5 * 7 + 4 + 1 == LONG.completion_tokens  # <think>, 5 per step, </think>\boxed{x}, EOS
        longest = max(longest, len(tokenizer.encode(problem.prompt + completion, add_special_tokens=False)))
    assert LONG.completion_tokens < config.max_completion_length and longest + 11 < 128  # max_position_embeddings


def test_config_for_task_and_hops():
    short = pipeline.DemoConfig.for_task("short")
    assert pipeline.replace(short, hops=None) == pipeline.DemoConfig()  # the short demo's defaults, unchanged
    assert short.demo_task.make_split("test", 20) == task.make_split("test", 20)
    long = pipeline.DemoConfig.for_task("long", hops=6, seed=3)
    assert (long.task_name, long.hops, long.seed, long.teacher_error_rates) == ("long", 6, 3, (E,))
    assert long.budgets == (4, 8, 16, 32) and long.beam_width == 4
    problem = long.demo_task.make_problem(5)
    current, _, start = parse_prompt(problem.prompt)
    assert problem.hops == 6 and problem.answer == walk(current, start, 6)
    assert len(parse_steps(long.demo_task.teacher_completion(problem, random.Random(0)))) == 6
    for bad in (0, 8, "7"):
        with pytest.raises(ValueError):
            task.get_task("long", bad)
    with pytest.raises(ValueError):
        task.get_task("medium")


def _long_summary(bon, majority, auc=0.99):
    metrics = {}
    for n, (mean, low, high), vote in zip((4, 8, 16, 32), bon, majority):
        metrics[f"bon_sprm@{n}"] = {"mean": mean, "ci_low": low, "ci_high": high}
        metrics[f"majority@{n}"] = {"mean": vote}
    return {"metrics": metrics, "budgets": {"4": 4, "8": 8, "16": 16, "32": 32}, "sprm_auc": auc}


def test_long_targets_need_search_intervals_apart_from_best_of_n():
    bon = [(0.30, 0.26, 0.34), (0.55, 0.50, 0.60), (0.72, 0.67, 0.77), (0.93, 0.90, 0.96)]
    summary = _long_summary(bon, (0.05, 0.04, 0.02, 0.01))
    searches = {f"{s}@{n}": {"mean": 0.97, "ci_low": 0.95, "ci_high": 0.99} for s in ("beam", "dvts") for n in (4, 8)}
    searches |= {f"{s}@16": {"mean": 0.80, "ci_low": 0.78, "ci_high": 0.83} for s in ("beam", "dvts")}
    targets = pipeline.check_targets(summary, searches, "long")
    assert len(targets) == 5 and all(met for _, met, _ in targets), targets
    overlapping = dict(searches, **{"dvts@16": {"mean": 0.79, "ci_low": 0.76, "ci_high": 0.82}})  # 0.76 < 0.77
    met = {name: ok for name, ok, _ in pipeline.check_targets(summary, overlapping, "long")}
    assert met["beam above BoN-SPRM at N = 4, 8, 16 (95% intervals apart)"]
    assert not met["dvts above BoN-SPRM at N = 4, 8, 16 (95% intervals apart)"]
    missing = {k: v for k, v in searches.items() if k != "beam@8"}
    assert not pipeline.check_targets(summary, missing, "long")[0][1]
    worse = _long_summary(bon, (0.05, 0.6, 0.02, 0.01), auc=0.7)
    met = {name: ok for name, ok, _ in pipeline.check_targets(worse, searches, "long")}
    assert not met["BoN-SPRM > majority at every N"] and not met["SPRM AUC >= 0.85"]
    quick = _long_summary(bon, (0.05, 0.04, 0.02, 0.01))
    quick["budgets"] = {"4": 4, "8": 8}
    assert pipeline.check_targets(quick, searches, "long") == [pipeline.check_targets(quick, searches, "long")[0]]


def test_long_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--task", "long", "--hops", "6", "--quick", "--output-dir", str(out), "--no-progress"]
    assert main([*argv, "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    for expected in ("| bon_sprm |", "| beam |", "| dvts |", "Targets:", "6 steps", "M = 4 children per kept beam"):
        assert expected in printed, expected
    run = json.loads((out / "demo_run.json").read_text())
    assert run["config"]["task_name"] == "long" and run["config"]["hops"] == 6
    assert run["config"]["max_completion_length"] == 1 + 5 * 6 + 4 + 1 + 11
    assert set(run["searches"]) == {"beam@4", "beam@8", "dvts@4", "dvts@8"}  # --quick: 8 samples, N = 4 and 8
    card = (out / "checkpoint" / "README.md").read_text()
    assert "long stale-fact pointer chase" in card.lower()
