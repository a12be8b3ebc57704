"""SPRM scoring primitives of MetaStone-S1: the step mask, the trajectory score and their checks.

The one definition of which tokens end a scored reasoning step ([`sprm_step_token_mask`]), used by scoring,
training and generation, and its incremental form for decoding ([`IncrementalStepRule`]), derived from it.

Self-contained on purpose: this file is copied into every saved checkpoint (beside the modeling and generation
files, which import it) and imports only ``torch`` and ``transformers``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers.utils import ModelOutput, logging

logger = logging.get_logger(__name__)

# --------------------------------------------------------------------------------------------------
# The step mask: one function, used by scoring, generation and training.
# --------------------------------------------------------------------------------------------------


def sprm_step_token_mask(
    input_ids: torch.Tensor,
    step_token_ids: Sequence[int] | torch.Tensor,
    think_start_token_id: int | None,
    think_end_token_id: int | None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mark the step tokens that end a scored reasoning step (the official MetaStone-S1 semantics).

    A position ``t`` is marked when ``input_ids[t]``:

    1. is one of ``step_token_ids``;
    2. is the first of a run of consecutive step tokens;
    3. does not come right after ``<think>``;
    4. lies after the first ``<think>`` and before the last ``</think>`` (no ``</think>``: up to the end).

    Rows without a ``<think>`` token, and every row when ``think_start_token_id`` is ``None``, are scored
    from their first token (the documented fallback for tokenizers without a thinking span). Padding
    (``attention_mask == 0``) is never a step and never breaks or joins a run; a step token that is the first
    real token of its row is dropped, since no position precedes it to read its score from.

    Args:
        input_ids: ``[B, T]`` token ids (left or right padded).
        step_token_ids: ids that end a step (``[382]`` for Qwen2 tokenizers).
        think_start_token_id / think_end_token_id: ids of ``<think>`` / ``</think>``, or ``None``.
        attention_mask: ``[B, T]``, 1 for real tokens.

    Returns:
        ``[B, T]`` bool mask of step-token positions. The *score* of a step is read one position
        earlier; see [`sprm_score_mask`].
    """
    if input_ids.ndim != 2:
        raise ValueError(f"`input_ids` must be [batch, seq_len], got shape {tuple(input_ids.shape)}.")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"`attention_mask` shape {tuple(attention_mask.shape)} differs from `input_ids` shape "
            f"{tuple(input_ids.shape)}."
        )
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(torch.bool)
    step_ids = torch.as_tensor(step_token_ids, device=input_ids.device, dtype=input_ids.dtype).reshape(-1)
    is_step = torch.isin(input_ids, step_ids) & valid
    previous_is_step = F.pad(is_step[:, :-1], (1, 0), value=False)
    previous_is_real = F.pad(valid[:, :-1], (1, 0), value=False)
    # A step token that is the first real token has no position before it to read a score from.
    keep = is_step & ~previous_is_step & previous_is_real

    if think_start_token_id is not None:
        is_start = (input_ids == think_start_token_id) & valid
        previous_is_start = F.pad(is_start[:, :-1], (1, 0), value=False)
        keep &= ~previous_is_start
        after_first_start = is_start.cumsum(dim=1) > 0
        row_has_start = is_start.any(dim=1, keepdim=True)
        keep &= after_first_start | ~row_has_start
    if think_end_token_id is not None:
        is_end = (input_ids == think_end_token_id) & valid
        ends_at_or_after = is_end.flip(1).cumsum(dim=1).flip(1) > 0
        row_has_end = is_end.any(dim=1, keepdim=True)
        keep &= ends_at_or_after | ~row_has_end
    return keep


def check_token_batch(
    input_ids: Any, attention_mask: Any | None, vocab_size: int, name: str = "input_ids"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate token ids and their mask before any work; returns ``[B, T]`` ids and mask (all ones by default).

    Raises ``ValueError``/``TypeError`` naming the argument and the fix instead of an error from inside torch (an
    out-of-vocabulary id would otherwise surface as an ``IndexError`` in the embedding lookup).
    """
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(
            f"`{name}` must be a torch tensor of token ids, got {type(input_ids).__name__}; use "
            "`tokenizer(texts, return_tensors='pt', padding=True)`."
        )
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"`{name}` must hold integer token ids, got dtype {input_ids.dtype}; use `.long()`.")
    if input_ids.ndim == 1:
        input_ids = input_ids.unsqueeze(0)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 1:
            attention_mask = attention_mask.unsqueeze(0)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"`{name}` must be a non-empty [batch, seq_len] tensor, got shape {tuple(input_ids.shape)}.")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        bad = int(input_ids.max()) if int(input_ids.max()) >= vocab_size else int(input_ids.min())
        raise ValueError(
            f"`{name}` holds token id {bad}, outside the model's vocabulary (vocab_size={vocab_size}): the ids come "
            "from another tokenizer, or padding uses an invalid id. Tokenize with the checkpoint's own tokenizer."
        )
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"`attention_mask` must be a torch tensor, got {type(attention_mask).__name__}.")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"`attention_mask` shape {tuple(attention_mask.shape)} differs from `{name}` shape "
            f"{tuple(input_ids.shape)}; pass the mask the tokenizer returned with these ids."
        )
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("`attention_mask` must hold 0 (padding) and 1 (real token) only.")
    if not bool(attention_mask.bool().any(dim=-1).all()):
        raise ValueError("A row of `attention_mask` is all padding: every row needs at least one real token.")
    return input_ids, attention_mask


def sprm_score_mask(step_token_mask: torch.Tensor) -> torch.Tensor:
    """Positions whose SPRM logit scores a step: the position just before each kept step token."""
    return F.pad(step_token_mask[:, 1:], (0, 1), value=False)


def sprm_trajectory_log_scores(step_logits: torch.Tensor, score_mask: torch.Tensor) -> torch.Tensor:
    """Log of the geometric mean of the step scores, ``mean(logsigmoid(z))`` over the masked positions.

    Computed in float32 log space, so thousands of steps in bf16 never underflow. A trajectory with no
    step gets ``-inf`` (score 0): it ranks below every trajectory that has steps.
    """
    if step_logits.shape != score_mask.shape:
        raise ValueError(
            f"`step_logits` {tuple(step_logits.shape)} and `score_mask` {tuple(score_mask.shape)} must have one shape."
        )
    log_probs = F.logsigmoid(step_logits.float()).masked_fill(~score_mask, 0.0)
    counts = score_mask.sum(dim=-1)
    mean = log_probs.sum(dim=-1) / counts.clamp(min=1)
    return mean.masked_fill(counts == 0, float("-inf"))


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


@dataclass
class SPRMScores(ModelOutput):
    """Result of [`MetaStoneForCausalLMWithSPRM.score_trajectories`].

    Args:
        scores: ``[B]`` trajectory scores, the geometric mean of the step scores (0 for no step).
        log_scores: ``[B]`` their logs (``-inf`` for no step).
        step_scores: per trajectory, a 1-D tensor of ``sigmoid`` step scores in order.
        step_logits: per trajectory, the raw step logits.
        step_positions: per trajectory, the positions whose hidden state scored each step (one before the
            step token).
        num_steps: ``[B]`` number of steps.
    """

    scores: torch.Tensor | None = None
    log_scores: torch.Tensor | None = None
    step_scores: list[torch.Tensor] | None = None
    step_logits: list[torch.Tensor] | None = None
    step_positions: list[torch.Tensor] | None = None
    num_steps: torch.Tensor | None = None


def build_sprm_scores(step_logits: torch.Tensor, score_mask: torch.Tensor) -> SPRMScores:
    """Assemble [`SPRMScores`] from per-position logits ``[B, T]`` and the score mask ``[B, T]``.

    Rows with a non-finite step logit (NaN/inf features) get a NaN score, which every selection ranks last;
    a warning names them.
    """
    broken_rows = (~torch.isfinite(step_logits) & score_mask).any(dim=-1).nonzero().flatten().tolist()
    if broken_rows:
        logger.warning(
            "Non-finite SPRM logits (NaN/inf features) in trajectories %s: their score is NaN and Best-of-N ranks "
            "them last. Check the model weights and the dtype (fp16 overflow).",
            broken_rows,
        )
    log_scores = sprm_trajectory_log_scores(step_logits, score_mask)
    per_row_logits = [row[mask] for row, mask in zip(step_logits.float(), score_mask)]
    return SPRMScores(
        scores=log_scores.exp(),
        log_scores=log_scores,
        step_scores=[torch.sigmoid(z) for z in per_row_logits],
        step_logits=per_row_logits,
        step_positions=[mask.nonzero().flatten() for mask in score_mask],
        num_steps=score_mask.sum(dim=-1),
    )


def execution_device(model: nn.Module) -> torch.device:
    """The device a model's forward takes its inputs on.

    The device of its parameters, except under accelerate's big-model dispatch (``device_map=...``): there the
    offloaded parameters sit on ``meta`` and a hook moves them, and the inputs, to its ``execution_device`` when a
    module runs. The first module with such a hook (the model itself or its input embeddings) names the device.
    """
    for module in model.modules():
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class IncrementalStepRule:
    """The step mask of sequences that grow one token at a time: the form of [`sprm_step_token_mask`] for decoding.

    For the token just appended to each row, [`update`] answers two questions:

    * ``candidate``: does it pass the rules that only look back (a step id, the first of its run, not right after
      ``<think>``)? That answer is final once the token is sampled, so its logit is worth keeping;
    * ``counts``: is it a step of the sequence so far, i.e. ``sprm_step_token_mask(sequences)[:, -1]``? That is a
      candidate with no ``</think>`` before it. The span rules (first ``<think>`` ... last ``</think>``) may still
      change with later tokens (a second ``</think>``), so final scores apply [`sprm_step_token_mask`] to the
      finished sequences; ``counts`` is what ranking and pruning see while decoding.

    Both are tested equal to [`sprm_step_token_mask`] on growing prefixes.

    Args:
        step_token_ids / think_start_token_id / think_end_token_id: as in [`sprm_step_token_mask`].
        sequences: ``[R, T]`` the tokens so far (the prompts), left padded.
        attention_mask: ``[R, T]``, 1 for real tokens.
    """

    def __init__(
        self,
        step_token_ids: Sequence[int] | torch.Tensor,
        think_start_token_id: int | None,
        think_end_token_id: int | None,
        sequences: torch.Tensor,
        attention_mask: torch.Tensor,
    ):
        self.step_ids = torch.as_tensor(step_token_ids, device=sequences.device, dtype=sequences.dtype).reshape(-1)
        self.think_start_token_id = think_start_token_id
        self.think_end_token_id = think_end_token_id
        real = attention_mask.bool()
        last_real = (real.long().cumsum(dim=1) * real).argmax(dim=1)  # left padding: the last real column
        self.previous = sequences.gather(1, last_real[:, None]).squeeze(1)
        if think_end_token_id is None:
            self.seen_end = torch.zeros_like(self.previous, dtype=torch.bool)
        else:
            self.seen_end = ((sequences == think_end_token_id) & real).any(dim=1)

    def update(self, new_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one token per row; returns ``(candidate, counts)`` for it (``[R]`` bool each)."""
        candidate = torch.isin(new_tokens, self.step_ids) & ~torch.isin(self.previous, self.step_ids)
        if self.think_start_token_id is not None:
            candidate &= self.previous != self.think_start_token_id
        counts = candidate & ~self.seen_end
        if self.think_end_token_id is not None:
            self.seen_end = self.seen_end | (new_tokens == self.think_end_token_id)
        self.previous = new_tokens
        return candidate, counts

    def select(self, indices: torch.Tensor) -> None:
        """Keep (and repeat) rows: row ``i`` becomes old row ``indices[i]``."""
        self.previous = self.previous[indices]
        self.seen_end = self.seen_end[indices]


__all__ = [
    "execution_device",
    "IncrementalStepRule",
    "SPRMScores",
    "build_sprm_scores",
    "check_token_batch",
    "eval_mode",
    "sprm_score_mask",
    "sprm_step_token_mask",
    "sprm_trajectory_log_scores",
]
