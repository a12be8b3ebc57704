"""The SPRM head's optimizer group and schedule, against what the Trainer builds without them."""

from __future__ import annotations

import torch
from test_training_trainer import SyntheticTask

from metastone_hf.training.head_optimization import (
    HEAD_GROUP_NAME,
    give_head_its_schedule,
    move_head_to_own_group,
    schedule_lambda,
)


def _groups_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[frozenset, dict]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        (frozenset(names[id(p)] for p in g["params"]), {k: v for k, v in g.items() if k != "params"})
        for g in optimizer.param_groups
    ]


def test_policy_keeps_the_groups_the_trainer_builds(tmp_path):
    task = SyntheticTask()
    plain = task.trainer(tmp_path / "plain", sprm_learning_rate=None, weight_decay=0.1)
    expected = _groups_by_name(plain.model, plain.create_optimizer())
    assert len(expected) == 2  # transformers' decay / no-decay split

    trainer = task.trainer(tmp_path / "split", sprm_learning_rate=3e-5, sprm_weight_decay=0.01, weight_decay=0.1)
    groups = _groups_by_name(trainer.model, trainer.create_optimizer())
    head_names = {n for n, _ in trainer.model.named_parameters() if n.startswith("sprm_head.")}
    assert groups[-1][0] == head_names
    assert groups[-1][1]["name"] == HEAD_GROUP_NAME
    assert (groups[-1][1]["lr"], groups[-1][1]["weight_decay"]) == (3e-5, 0.01)
    assert [(names, options) for names, options in groups[:-1]] == [
        (names - head_names, options) for names, options in expected if names - head_names
    ]


def test_an_optimizer_without_the_head_is_left_alone():
    policy, head = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    before = [list(g["params"]) for g in optimizer.param_groups]
    assert not move_head_to_own_group(optimizer, head.parameters(), lr=1e-5, weight_decay=0.0)
    assert [list(g["params"]) for g in optimizer.param_groups] == before


def test_head_schedule_is_its_own_while_the_policy_follows_its_schedule():
    from transformers import get_scheduler

    policy, head = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW([*policy.parameters(), *head.parameters()], lr=1e-3)
    assert move_head_to_own_group(optimizer, head.parameters(), lr=1e-2, weight_decay=0.0)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=10)
    assert give_head_its_schedule(scheduler, schedule_lambda("constant", 2, 10))
    policy_lrs, head_lrs = [], []
    for _ in range(10):
        policy_lrs.append(optimizer.param_groups[0]["lr"])
        head_lrs.append(optimizer.param_groups[1]["lr"])
        optimizer.step()
        scheduler.step()
    reference = [1e-3 * (s / 2 if s < 2 else (10 - s) / 8) for s in range(10)]  # linear warmup then decay
    torch.testing.assert_close(torch.tensor(policy_lrs), torch.tensor(reference))
    assert head_lrs == [1e-2] * 10
