"""The SPRM head's own optimizer group, learning-rate schedule and gradient clipping, beside the policy's.

The head trains at its own learning rate (``sprm_learning_rate``), on a constant schedule while the policy follows
``lr_scheduler_type``, and with its gradients clipped on their own, so that a large head gradient never shrinks the
policy's update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler

HEAD_GROUP_NAME = "sprm_head"
"""The ``name`` of the head's optimizer parameter group."""


def move_head_to_own_group(
    optimizer: torch.optim.Optimizer, head_parameters: Iterable[nn.Parameter], lr: float, weight_decay: float
) -> bool:
    """Take the head's parameters out of ``optimizer``'s groups into a group of their own, before the first step.

    The policy keeps the groups the trainer built (decay / no decay, ...). Returns ``False``, changing nothing, when
    the optimizer does not hold the head in its groups (optimizers that build their own groups, e.g. layer-wise).
    """
    head = list(head_parameters)
    head_ids = {id(p) for p in head}
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not head_ids or not head_ids <= held:
        return False
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in head_ids]
    optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]]
    optimizer.add_param_group({"params": head, "lr": lr, "weight_decay": weight_decay, "name": HEAD_GROUP_NAME})
    return True


def schedule_lambda(name: str, num_warmup_steps: int, num_training_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier of transformers' schedule ``name``, as a function of the step."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = get_scheduler(name, probe, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps)
    if not isinstance(schedule, LambdaLR):
        raise ValueError(
            f"`sprm_lr_scheduler_type={name!r}` is not a LambdaLR-based schedule; use constant, linear, cosine, ..."
        )
    return schedule.lr_lambdas[0]


def give_head_its_schedule(scheduler: LambdaLR, multiplier: Callable[[int], float]) -> bool:
    """Make the head's group of ``scheduler``'s optimizer follow ``multiplier``; ``False`` if it has no such group."""
    groups = scheduler.optimizer.param_groups
    index = next((i for i, group in enumerate(groups) if group.get("name") == HEAD_GROUP_NAME), None)
    if index is None:
        return False
    scheduler.lr_lambdas[index] = multiplier
    lr = scheduler.base_lrs[index] * multiplier(scheduler.last_epoch)
    groups[index]["lr"] = lr
    scheduler._last_lr[index] = lr
    return True


def split_policy_and_head(
    parameters: Iterable[nn.Parameter], head_parameters: Iterable[nn.Parameter]
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``parameters`` split into (policy, head), in their order."""
    head_ids = {id(p) for p in head_parameters}
    policy: list[nn.Parameter] = []
    head: list[nn.Parameter] = []
    for parameter in parameters:
        (head if id(parameter) in head_ids else policy).append(parameter)
    return policy, head


def clip_gradients(parameters: list[nn.Parameter], max_norm: float) -> float:
    """Clip the gradients of ``parameters`` to ``max_norm`` (inf: measure only); returns their pre-clip norm."""
    with_grad = [p for p in parameters if p.grad is not None]
    if not with_grad:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(with_grad, max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor norm of FSDP2-sharded gradients
        norm = norm.full_tensor()
    return float(norm)


__all__ = [
    "HEAD_GROUP_NAME",
    "clip_gradients",
    "give_head_its_schedule",
    "move_head_to_own_group",
    "schedule_lambda",
    "split_policy_and_head",
]
