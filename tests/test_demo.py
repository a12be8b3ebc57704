"""`metastone demo`: the synthetic task's invariants, the result checks, and a shortened run of the whole pipeline."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import numpy as np
import pytest
from transformers import AutoModel

from metastone_hf import cli
from metastone_hf.cli import main
from metastone_hf.demo import pipeline, task
from metastone_hf.demo.pipeline import check_targets, error_type_stats


def test_tokenizer_round_trip_and_single_step_token():
    tok = task.build_tokenizer()
    assert len(tok.encode(task.STEP_TEXT, add_special_tokens=False)) == 1
    assert tok.padding_side == "left"
    problem = task.make_problem(3)
    text = problem.prompt + task.teacher_completion(problem, random.Random(0))
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.unk_token_id not in tok.encode(text, add_special_tokens=False)
    # a step is five tokens: node, decision, fact, restated tag, step token
    assert tok.tokenize("c>c(old)c~b(old)" + task.STEP_TEXT) == ["c>", "c(old)", "c~b", "(old)", task.STEP_TEXT]


def test_teacher_errors_concentrate_on_one_wrong_answer():
    rng = random.Random(0)
    problems = task.make_split("train", 200)
    wrong, on_the_trap_answer = 0, 0
    for p in problems:
        for _ in range(20):
            answer = task.extract_answer(task.teacher_completion(p, rng))
            if answer != p.answer:
                wrong += 1
                on_the_trap_answer += answer == p.wrong_answer
        assert task.reward(task.teacher_completion(p, rng, rates=(0.0, 0.0)), p.answer) == 1.0  # perfect teacher
    # wrong trajectories end on the problem's one wrong answer (rarely another: the detour can meet the trap again)
    assert wrong > 500 and on_the_trap_answer / wrong > 0.9
    after = [p for p in problems if p.stale_after]
    assert 0.3 < len(after) / len(problems) < 0.7
    assert task.teacher_error_rate(after[0]) > 0.5  # majority vote is wrong on these problems


def test_splits_are_disjoint_and_reward_is_exact():
    train = {p.uid for p in task.make_split("train", 500)}
    test = {p.uid for p in task.make_split("test", 500)}
    assert not train & test
    assert task.reward("<think>a>a(new)a:b(new).\n\n</think>\\boxed{b}", "b") == 1.0
    assert task.reward("<think>a>a(new)a:b(new).\n\n</think>\\boxed{c}", "b") == 0.0
    assert task.reward("\\boxed{b} without think end", "b") == 0.0


def test_every_error_type_is_named_by_classify_errors():
    rng = random.Random(0)
    problem = task.make_problem(3)  # facts "e~c g:f c:e b~g a:c e:d b:h d:b h:g f:a", start c, trap e~c
    assert problem.start == "c" and (problem.trap_key, problem.trap_value) == ("e", "c")
    good = ["c>c(new)c:e(new)", "e>e(new)e:d(new)", "d>d(new)d:b(new)"]

    def completion(steps, answer="b"):
        return task.format_completion(steps, answer)

    assert task.classify_errors(problem, completion(good)) == []
    assert task.reward(completion(good), problem.answer) == 1.0
    cases = {
        "stale": [good[0], "e>e(old)e~c(old)", "c>c(new)c:e(new)"],
        "misread": [good[0], "e>e(new)e:b(new)", "b>b(new)b:h(new)"],  # e:b is listed nowhere
        "mistagged": [good[0], "e>e(new)e~c(new)", "c>c(new)c:e(new)"],  # the stale fact tagged (new)
        "jump": [good[0], "d>d(new)d:b(new)", "b>b(new)b:h(new)"],
        "hops": good[:2],
    }
    for error, steps in cases.items():
        assert error in task.classify_errors(problem, completion(steps, steps[-1][-6])), error
    assert task.classify_errors(problem, completion(good, "h")) == ["answer"]
    assert task.classify_errors(problem, "<think>c>c:e.\n\n</think>\\boxed{e}") == ["hops", "answer", "format"]
    assert task.classify_errors(problem, "no think span") == ["format"]
    # the teacher makes exactly one kind of error, and tags it
    kinds = {tuple(task.classify_errors(p, task.teacher_completion(p, rng))) for p in task.make_split("train", 300)}
    assert kinds == {(), ("stale",)}


def test_error_type_stats_counts_shares_and_separation():
    problem = task.make_problem(3)
    good = task.format_completion(["c>c(new)c:e(new)", "e>e(new)e:d(new)", "d>d(new)d:b(new)"], "b")
    stale = task.format_completion(["c>c(new)c:e(new)", "e>e(old)e~c(old)", "c>c(new)c:e(new)"], "e")
    invented = task.format_completion(["c>c(new)c:e(new)", "e>e(new)e:b(new)", "b>b(new)b:h(new)"], "h")
    completions = [[good, stale, invented, good]]
    correct = np.array([[1, 0, 0, 1]])
    scores = np.array([[0.9, 0.1, 0.95, 0.8]])  # the stale one is caught, the misread one is not
    stats = error_type_stats([problem], completions, correct, scores)
    assert stats["stale"] == {"share": 0.25, "wrong": 1, "auc": 1.0}
    assert stats["misread"]["share"] == 0.25 and stats["misread"]["auc"] == 0.0
    assert stats["jump"]["share"] == 0.0 and math.isnan(stats["jump"]["auc"])


def test_centre_sprm_head_gives_both_signs_to_the_steps():
    import torch

    tokenizer, config = task.build_tokenizer(), pipeline.DemoConfig()
    model = pipeline.build_demo_model(tokenizer, config)
    with torch.no_grad():
        model.sprm_head[-1].bias += 3.0  # a head that scores every step positive: the SPR loss keeps no negative
    problems = task.make_split("train", 64, seed=5)
    ids, mask, _ = pipeline.sft_batch(tokenizer, problems, random.Random(0), config.teacher_error_rates)
    before = torch.cat(model.score_trajectories(ids, mask).step_logits)
    shift = pipeline.centre_sprm_head(model, tokenizer, config)
    after = torch.cat(model.score_trajectories(ids, mask).step_logits)
    assert (before > 0).all() and shift > 2.5
    assert 0.3 < (after > 0).float().mean() < 0.7  # on other problems too, about half the steps on each side
    assert torch.allclose(after, before - shift, atol=1e-5)  # only the bias moved: the ranking is unchanged


def test_sft_batch_outcomes_are_the_answers_correctness():
    tokenizer = task.build_tokenizer()
    problems = task.make_split("train", 64, seed=9)
    *_, outcomes = pipeline.sft_batch(tokenizer, problems, random.Random(3), (0.5, 0.5), return_outcomes=True)
    rng = random.Random(3)  # the same draws: the teacher's completions, graded here by their boxed answer
    expected = [task.teacher_completion(p, rng, (0.5, 0.5)).endswith("\\boxed{" + p.answer + "}") for p in problems]
    assert outcomes.tolist() == expected and 0 < sum(expected) < len(expected)


def test_sft_trains_the_head_only_when_asked():
    import torch

    tokenizer = task.build_tokenizer()
    heads = {}
    for weight in (0.0, 1.0):
        config = pipeline.DemoConfig(sft_steps=3, sft_batch_size=8, sft_sprm_loss_weight=weight)
        model = pipeline.build_demo_model(tokenizer, config)
        before = {k: v.clone() for k, v in model.sprm_head.state_dict().items()}
        lm_before = model.lm_head.weight.clone()
        pipeline.run_sft(model, tokenizer, config, progress=False)
        heads[weight] = any(not torch.equal(before[k], v) for k, v in model.sprm_head.state_dict().items())
        assert not torch.equal(lm_before, model.lm_head.weight)
    assert heads == {0.0: False, 1.0: True}  # the paper's recipe (0) leaves the head to GRPO


def _summary(bon, majority, pass1=0.6, auc=0.95):
    """A summary shaped like `summarize`'s, with BoN-SPRM and majority at N = 2 / 8 / 32."""
    budgets = {"low": 2, "medium": 8, "high": 32}
    metrics = {"pass@1": {"mean": pass1}}
    for (label, n), b, m in zip(budgets.items(), bon, majority):
        metrics[f"bon_sprm@{n} ({label})"] = {"mean": b}
        metrics[f"majority@{n} ({label})"] = {"mean": m}
    return {"metrics": metrics, "budgets": budgets, "sprm_auc": auc}


def test_targets_are_the_scaling_shape():
    met = check_targets(_summary(bon=(0.75, 0.9, 0.95), majority=(0.6, 0.7, 0.72)))
    assert len(met) == 5 and all(ok for _, ok, _ in met)
    # BoN-SPRM@32 below @8: the shape the paper contradicts
    names = {name: ok for name, ok, _ in check_targets(_summary(bon=(0.75, 0.92, 0.81), majority=(0.6, 0.7, 0.72)))}
    assert not names["BoN-SPRM@2 <= @8 <= @32"] and names["BoN-SPRM@32 > majority@32"]
    names = {name: ok for name, ok, _ in check_targets(_summary((0.6, 0.65, 0.69), (0.6, 0.7, 0.72), auc=0.8))}
    assert not names["BoN-SPRM@8 > majority@8"] and not names["BoN-SPRM@32 > majority@32"]
    assert not names["BoN-SPRM@32 >= pass@1 + 10 points"] and not names["SPRM AUC >= 0.85"]
    partial = _summary((0.7, 0.8, 0.9), (0.6, 0.7, 0.7))
    del partial["metrics"]["bon_sprm@32 (high)"]
    assert check_targets(partial) == [check_targets(partial)[0]] and not check_targets(partial)[0][1]


@pytest.mark.parametrize(
    ("cores", "idle", "load", "expected"),
    [(2, 1.95, 3.0, 2), (2, 1.2, 0.0, 1), (1, 1.0, 0.0, 1), (16, 15.0, 15.0, 2), (2, None, 0.1, 2), (2, None, 1.2, 1)],
)
def test_demo_uses_a_second_thread_only_when_two_cores_are_free(monkeypatch, cores, idle, load, expected):
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(pipeline, "_idle_cores", lambda cores: idle)  # None: /proc/stat unreadable
    monkeypatch.setattr(pipeline.os, "getloadavg", lambda: (load, load, load))
    assert pipeline.default_threads() == expected


def test_idle_cores_reads_this_machine():
    import os

    idle = pipeline._idle_cores(set(os.sched_getaffinity(0)), seconds=0.05)
    assert idle is None or 0.0 <= idle <= len(os.sched_getaffinity(0))


def test_cli_runs_tiny_cpu_models_on_one_thread():
    import torch

    model = pipeline.build_demo_model(task.build_tokenizer(), pipeline.DemoConfig())
    torch.set_num_threads(2)
    cli._set_threads(None, model)  # 0.2M parameters: one thread unless told otherwise
    assert torch.get_num_threads() == 1
    cli._set_threads(2, model)
    assert torch.get_num_threads() == 2

    class Large:
        device = torch.device("cpu")

        def num_parameters(self):
            return 7_000_000_000

    cli._set_threads(None, Large())  # torch's default is left alone for a real model
    assert torch.get_num_threads() == 2


@pytest.mark.slow
def test_shortened_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out), "--no-progress", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    for expected in ("| bon_sprm |", "| beam |", "| dvts |", "| stale |", "Targets:", "wall time"):
        assert expected in printed, expected
    assert {
        "checkpoint",
        "results.md",
        "accuracy_vs_n.png",
        "accuracy_vs_tokens.png",
        "demo_report.json",
        "demo_run.json",
    } <= {p.name for p in out.iterdir()}
    model = AutoModel.from_pretrained(out / "checkpoint", trust_remote_code=True)
    assert hasattr(model, "score_trajectories")
    # The checkpoint says how it reads a question, and the CLI prompts it that way by default.
    assert model.config.prompt_template == "{question}" + task.THINK
    question = task.make_problem(10**6).prompt
    common = ["--model", str(out / "checkpoint"), "--num-candidates", "2", "--max-new-tokens", "40", "--json",
              "--no-progress"]  # fmt: skip
    assert main(["generate", "--prompt", question, *common]) == 0
    generated = capsys.readouterr()
    assert "'{question}<think>', recorded in the checkpoint" in generated.err
    assert main(["generate", "--raw-prompt", "--prompt", question + task.THINK, *common]) == 0
    assert json.loads(capsys.readouterr().out)[0]["answer"] == json.loads(generated.out)[0]["answer"]
    card = (out / "checkpoint" / "README.md").read_text()
    assert "bon_sprm@8 (medium)" in card and "stale-fact" in card and "beam@8 (medium)" in card
    run = json.loads((out / "demo_run.json").read_text())
    assert run["config"]["sft_steps"] == 30 and set(run["timings_s"]) >= {"sft", "grpo+spr", "eval", "total"}
    assert run["threads"] == 1 and set(run["error_types"]) == set(task.ERROR_TYPES)
    # --quick samples 8 per problem: the searches run at N = 2 and 8, each generating about N samples' tokens
    assert set(run["searches"]) == {"beam@2 (low)", "beam@8 (medium)", "dvts@2 (low)", "dvts@8 (medium)"}
    for key, entry in run["searches"].items():
        assert 0.0 <= entry["mean"] <= 1.0
        assert entry["tokens_per_question"] == pytest.approx(entry["n"] * run["tokens_per_sample"], rel=0.5), key
    # the output folder is never silently overwritten
    assert main(["demo", "--quick", "--output-dir", str(out), "--no-progress"]) == 2


def test_demo_evaluation_does_not_depend_on_its_batch_size():
    # evaluate_demo goes through the eval runner: every problem samples from a seed of its own, so batching the
    # held-out problems differently changes no sample or search result (scores only by padding's float rounding).
    config = pipeline.DemoConfig(eval_problems=3, samples=4, budgets=(2, 4), max_completion_length=24)
    tokenizer = task.build_tokenizer()
    model = pipeline.build_demo_model(tokenizer, config).eval()
    one = pipeline.evaluate_demo(model, tokenizer, replace(config, eval_batch_size=1), progress=False)
    three = pipeline.evaluate_demo(model, tokenizer, replace(config, eval_batch_size=3), progress=False)
    assert one.records.completions == three.records.completions and len(one.records.completions) == 3
    np.testing.assert_allclose(one.records.scores, three.records.scores, rtol=1e-5)
    np.testing.assert_array_equal(one.tokens, three.tokens)
    assert set(one.searches) == set(three.searches) == {"beam@2", "beam@4", "dvts@2", "dvts@4"}
    for key, entry in one.searches.items():
        assert entry == pytest.approx(three.searches[key]), key
