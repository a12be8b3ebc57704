"""`metastone demo --task verify`: the task checked against references computed here from the prompt text alone, and
the proof that nothing in a step's own tokens marks it wrong.

The facts, their order and the start are parsed from the prompt string, the current fact of a node is taken to be its
last-listed one by hand, and teacher completions are parsed with a regex of their own, so a wrong `VerifyProblem`
field, teacher, labeller or classifier is caught rather than echoed.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter

import numpy as np
import pytest
from conftest import demo_completion_steps

from metastone_hf.cli import main
from metastone_hf.demo import pipeline, task

VERIFY = task.get_task("verify")
NEAR, FAR = task.VERIFY_TEACHER_ERROR_RATES
STEP = re.compile(r"([a-h])>\1:([a-h])")


def parse_prompt(prompt: str) -> tuple[list, dict, str]:
    """(facts in order, the last-listed value of each node, start) read from the prompt string."""
    facts, start = prompt.rsplit(" ?", 1)
    listed = []
    for fact in facts.split(" "):
        assert len(fact) == 3 and fact[1] == ":", fact  # every fact in the same form: no stale marker
        listed.append((fact[0], fact[2]))
    return listed, {k: v for k, v in listed}, start  # a later fact of a node overrides an earlier one


def walk(successor: dict, node: str, edges: int) -> str:
    for _ in range(edges):
        node = successor[node]
    return node


def sloppy_walk(listed: list, node: str, edges: int) -> str:
    """Follow the first-listed fact of every node (the overridden one where a node has two)."""
    first = {}
    for key, value in listed:
        first.setdefault(key, value)
    return walk(first, node, edges)


def parse_steps(completion: str) -> list[tuple[str, str]]:
    """The steps of a well-formed completion as (node, cited value), by a regex independent of the task's."""
    return demo_completion_steps(completion, STEP)


def hand_completion(values: list, start: str) -> str:
    node, text = start, ""
    for value in values:
        text += f"{node}>{node}:{value}.\n\n"
        node = value
    return f"<think>{text}</think>\\boxed{{{node}}}"


def test_problems_list_updates_in_the_same_form_and_the_last_listed_fact_holds():
    fars = []
    for problem in VERIFY.make_split("train", 400):
        listed, current, start = parse_prompt(problem.prompt)
        per_node = Counter(k for k, _ in listed)
        assert set(per_node) == set(task.NODES) and sorted(per_node.values()) == [1] * 5 + [2] * 3
        assert {walk(current, "a", k) for k in range(8)} == set(task.NODES)  # the last-listed facts: one 8-cycle
        assert start == problem.start and problem.hops == task.VERIFY_HOPS == 4
        assert problem.answer == walk(current, start, 4)
        chain = [walk(current, start, k) for k in range(4)]
        updated = [k for k in per_node if per_node[k] == 2]
        assert problem.trap_key in chain
        first = next(v for k, v in listed if k == problem.trap_key)
        assert first == problem.trap_old != current[problem.trap_key]
        hop = chain.index(problem.trap_key)
        # the step after the trap's is at an updated node whichever fact the trap's step cites
        assert hop < 3 and chain[hop + 1] in updated and problem.trap_old in updated
        assert problem.wrong_answer == sloppy_walk(listed, start, 4) != problem.answer
        positions = [i for i, (k, _) in enumerate(listed) if k == problem.trap_key]
        assert problem.far == (positions[1] - positions[0] > 1)  # far: the update is not right after
        for k in updated:  # the other updates come right after the fact they override
            if k != problem.trap_key:
                i, j = (i for i, (key, _) in enumerate(listed) if key == k)
                assert j == i + 1
        fars.append(problem.far)
    assert 0.4 < np.mean(fars) < 0.6


def test_splits_are_disjoint_and_deterministic():
    train = {p.prompt for p in VERIFY.make_split("train", 1000)}
    test = [p.prompt for p in VERIFY.make_split("test", 200)]
    assert not train & set(test) and len(set(test)) == 200
    assert [p.prompt for p in VERIFY.make_split("test", 200)] == test


def test_teacher_is_careful_or_sloppy_at_the_configured_rates():
    rng = random.Random(0)
    sloppy = {True: [], False: []}
    for problem in VERIFY.make_split("train", 4000, seed=3):
        listed, current, start = parse_prompt(problem.prompt)
        first = {}
        for key, value in listed:
            first.setdefault(key, value)
        completion = VERIFY.teacher_completion(problem, rng)
        steps = parse_steps(completion)
        assert len(steps) == 4
        cited_first = [value == first[at] != current[at] for at, value in steps]
        node = start
        for at, value in steps:
            assert at == node and (at, value) in listed  # every step cites a listed fact of its node
            node = value
        # careful: the last-listed fact everywhere; sloppy: the first-listed one at every node (the trap first)
        is_sloppy = any(cited_first)
        expected = first if is_sloppy else current
        assert [value for _, value in steps] == [walk(expected, start, k) for k in range(1, 5)]
        assert task.extract_answer(completion) == node == (problem.wrong_answer if is_sloppy else problem.answer)
        assert task.reward(completion, problem.answer) == (0.0 if is_sloppy else 1.0)
        if is_sloppy:
            assert steps[cited_first.index(True)][0] == problem.trap_key
        sloppy[problem.far].append(is_sloppy)
    for far, rate in ((False, NEAR), (True, FAR)):
        got = np.mean(sloppy[far])
        assert abs(got - rate) < 4 * math.sqrt(rate * (1 - rate) / len(sloppy[far])), (far, got)
    perfect = VERIFY.teacher_completion(VERIFY.make_problem(11), rng, rates=(0.0, 0.0))
    assert VERIFY.classify_errors(VERIFY.make_problem(11), perfect) == []


def test_every_kind_of_wrong_step_is_named_and_labelled():
    problem = VERIFY.make_problem(12345)
    listed, current, start = parse_prompt(problem.prompt)
    right = [walk(current, start, k) for k in range(1, 5)]
    good = hand_completion(right, start)
    assert VERIFY.classify_errors(problem, good) == [] and task.reward(good, problem.answer) == 1.0
    assert [r for _, r in task.verify_step_labels(problem, good)] == [True] * 4
    hop = [walk(current, start, k) for k in range(4)].index(problem.trap_key)
    values = [*right[:hop], problem.trap_old]
    for _ in range(4 - hop - 1):
        values.append(current[values[-1]])
    overridden = hand_completion(values, start)
    assert VERIFY.classify_errors(problem, overridden) == ["overridden"]
    labels = task.verify_step_labels(problem, overridden)
    assert [r for _, r in labels] == [True] * hop + [False]  # up to the first wrong step, later ones left out
    assert labels[-1][0] == f"{problem.trap_key}>{problem.trap_key}:{problem.trap_old}"
    x = start
    unlisted = next(v for v in task.NODES if v != x and (x, v) not in listed)
    misread = hand_completion([unlisted] + [walk(current, unlisted, k) for k in range(1, 4)], start)
    assert VERIFY.classify_errors(problem, misread) == ["misread"]
    jump = good.replace(f"{right[0]}>", f"{right[1]}>", 1)
    assert "jump" in VERIFY.classify_errors(problem, jump)
    three = hand_completion(right[:3], start)
    assert VERIFY.classify_errors(problem, three) == ["hops"]
    assert VERIFY.classify_errors(problem, good.replace(f"{{{right[-1]}}}", "{z}")) == ["answer"]
    assert VERIFY.classify_errors(problem, good.replace("</think>", "")) == ["format"]
    kinds = {
        tuple(VERIFY.classify_errors(p, VERIFY.teacher_completion(p, random.Random(p.uid))))
        for p in VERIFY.make_split("train", 300)
    }
    assert kinds == {(), ("overridden",)}


def test_right_and_wrong_steps_are_written_with_the_same_tokens():
    tokenizer = task.build_tokenizer()
    rng, right, wrong = random.Random(1), Counter(), Counter()
    for problem in VERIFY.make_split("train", 3000, seed=4):
        for text, ok in task.verify_step_labels(problem, VERIFY.teacher_completion(problem, rng)):
            ids = tokenizer.encode(text, add_special_tokens=False)
            assert len(ids) == 2 and tokenizer.unk_token_id not in ids  # the node and the fact, nothing else
            (right if ok else wrong)[ids[-1]] += 1
    assert set(wrong) <= set(right)  # no token that only wrong steps use
    # the cited fact (the last token, where the head reads) has the same distribution for both: a chi-square test
    tokens = sorted(set(right) | set(wrong))
    table = np.array([[right[t] for t in tokens], [wrong[t] for t in tokens]], dtype=float)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    chi2 = float(((table - expected) ** 2 / expected).sum())
    dof = len(tokens) - 1
    assert chi2 < dof + 4 * math.sqrt(2 * dof), (chi2, dof)


def test_bag_of_tokens_baselines_see_no_signal_on_the_teachers_traces():
    tokenizer = task.build_tokenizer()
    train = pipeline.labelled_teacher_steps(tokenizer, VERIFY, VERIFY.make_split("train", 3000, seed=5), 1)
    held_out = pipeline.labelled_teacher_steps(tokenizer, VERIFY, VERIFY.make_split("test", 600, seed=6), 2)
    aucs = pipeline.bag_of_tokens_aucs(train, held_out, len(tokenizer))
    assert all(0.40 <= auc <= 0.60 for auc in aucs.values()), aucs
    # the same baselines do find a marker when there is one: the short task's steps restate (old)/(new) at their end
    marked = []
    for traces in (train, held_out):
        marked.append([
            {**t, "steps": [([*ids, tokenizer.convert_tokens_to_ids("(new)" if ok else "(old)")], ok)
                            for ids, ok in t["steps"]]}
            for t in traces
        ])  # fmt: skip
    aucs = pipeline.bag_of_tokens_aucs(*marked, len(tokenizer))
    assert all(auc > 0.99 for auc in aucs.values()), aucs


def test_processbench_traces_have_their_first_wrong_step_where_the_prompt_says():
    for problem in VERIFY.make_split("test", 50):
        _, current, _ = parse_prompt(problem.prompt)
        for erroneous in (False, True):
            row = task.verify_processbench_trace(problem, erroneous)
            assert row["problem"] == problem.prompt + "<think>"
            steps = [STEP.fullmatch(s[:-1]).groups() for s in row["steps"][:-1]]
            wrong = [h for h, (at, value) in enumerate(steps) if value != current[at]]
            assert row["label"] == (wrong[0] if wrong else -1) and len(wrong) == int(erroneous)
            hop = [walk(current, problem.start, k) for k in range(4)].index(problem.trap_key)
            end = walk(current, problem.trap_old, 4 - hop - 1) if erroneous else problem.answer
            assert row["steps"][-1] == "\\boxed{" + end + "}" and (row["label"] == hop) == erroneous


def test_paired_completions_differ_only_in_the_cited_fact_at_the_trap():
    for problem in VERIFY.make_split("test", 100):
        listed, current, start = parse_prompt(problem.prompt)
        right, wrong, hop = task.verify_paired_completions(problem)
        right_steps, wrong_steps = parse_steps(right), parse_steps(wrong)
        chain = [walk(current, start, k) for k in range(4)]
        assert right_steps == list(zip(chain, [*chain[1:], problem.answer]))  # the perfect teacher
        assert hop == chain.index(problem.trap_key) and right_steps[:hop] == wrong_steps[:hop]
        node, value = wrong_steps[hop]
        assert node == problem.trap_key and value != current[node] and (node, value) in listed  # overridden, listed
        assert all(v == current[n] for n, v in wrong_steps[hop + 1 :])  # then the current facts from there on
        labels = [ok for _, ok in task.verify_step_labels(problem, wrong)]
        assert labels == [True] * hop + [False]


def test_verify_completions_fit_the_model_and_the_budget():
    tokenizer = task.build_tokenizer()
    config = pipeline.DemoConfig.for_task("verify")
    assert (config.task_name, config.hops, config.budgets, config.beam_width) == ("verify", 4, (4, 8, 16, 32), 4)
    for problem in VERIFY.make_split("test", 50):
        completion = VERIFY.teacher_completion(problem, random.Random(problem.uid)) + tokenizer.eos_token
        ids = tokenizer.encode(completion, add_special_tokens=False)
        assert tokenizer.decode(ids) == completion and tokenizer.unk_token_id not in ids
        assert len(ids) == 1 + 3 * 4 + 4 + 1 == VERIFY.completion_tokens
        assert len(tokenizer.encode(problem.prompt + completion, add_special_tokens=False)) + 11 < 128
    five = task.get_task("verify", 5).make_problem(3)
    _, current, start = parse_prompt(five.prompt)
    assert five.hops == 5 and five.answer == walk(current, start, 5)
    with pytest.raises(ValueError):
        task.get_task("verify", 1).make_problem(3)


def test_verify_targets():
    metrics = {"pass@1": {"mean": 0.5}, "bon_sprm@32": {"mean": 0.7}, "majority@32": {"mean": 0.6}}
    summary = {"metrics": metrics, "budgets": {"32": 32}, "sprm_auc": 0.9}
    analysis = {"head_step_auc": 0.9, "paired": {"auc": 0.88}, "bag_of_tokens_auc": 0.5, "last_token_auc": 0.55}
    assert all(met for _, met, _ in pipeline.check_verify_targets(summary, analysis))
    worse = dict(analysis, last_token_auc=0.61)
    met = {name: ok for name, ok, _ in pipeline.check_verify_targets(summary, worse)}
    assert not met["last-token AUC <= 0.60"] and met["bag-of-tokens AUC <= 0.60"]
    met = {name: ok for name, ok, _ in pipeline.check_verify_targets(summary, dict(analysis, paired={"auc": 0.84}))}
    assert not met["SPRM paired step AUC >= 0.85"] and met["SPRM step AUC >= 0.85"]
    low = {**summary, "metrics": dict(metrics, **{"bon_sprm@32": {"mean": 0.59}})}
    met = {name: ok for name, ok, _ in pipeline.check_verify_targets(low, analysis)}
    assert not met["BoN-SPRM@32 >= pass@1 + 10 points"] and not met["BoN-SPRM@32 > majority@32"]
    assert not pipeline.check_verify_targets({**summary, "budgets": {"8": 8}}, analysis)[0][1]


def test_verify_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--task", "verify", "--quick", "--output-dir", str(out), "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for expected in ("| bon_sprm |", "| beam |", "| dvts |", "| overridden |", "logistic regression, token counts",
                     "ProcessBench format", "Targets:", "4 steps"):  # fmt: skip
        assert expected in printed, expected
    run = json.loads((out / "demo_run.json").read_text())
    assert run["config"]["task_name"] == "verify" and run["config"]["max_completion_length"] == 18 + 11
    assert {"head_step_auc", "bag_of_tokens_auc", "last_token_auc", "processbench", "paired"} <= set(run["verify"])
    assert run["config"]["sft_sprm_loss_weight"] == 1.0 and "paired: the trap's step" in printed
    assert "fact-update pointer chase" in (out / "checkpoint" / "README.md").read_text().lower()
