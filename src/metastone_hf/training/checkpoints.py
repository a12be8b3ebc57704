"""Trainer checkpoints that are complete or absent: written into a staging folder, renamed into place, then pushed."""

from __future__ import annotations

import os
import shutil
from typing import Any

from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..atomic_writes import replace_folder

STAGING_PREFIX = "_partial-"
"""Staging folders are ``_partial-checkpoint-N``: ``get_last_checkpoint`` and checkpoint rotation only look at
``checkpoint-N``, and the Trainer's Hub upload of the output folder skips names starting with ``_``."""


class AtomicCheckpointsMixin:
    """For a transformers ``Trainer`` subclass (listed before the trainer in its bases): atomic checkpoints.

    Every process writes its files of ``checkpoint-N`` into ``_partial-checkpoint-N/checkpoint-N``; once all are done
    the main process renames the folder into place. A run killed while saving leaves only the staging folder, which
    resuming ignores and the next save removes, never a half-written ``checkpoint-N`` that resuming would pick up.
    With ``push_to_hub=True`` the upload (``hub_strategy="checkpoint"`` included, which uploads the checkpoint folder
    in the background) starts once the checkpoint is in its final place.
    """

    _checkpoint_staging: str | None = None
    _push_waiting: bool = False

    def _get_output_dir(self, trial: Any) -> str:
        if self._checkpoint_staging is not None:
            return self._checkpoint_staging  # the Trainer writes `<this>/checkpoint-N` on every process
        return super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if self._checkpoint_staging is not None:
            self._push_waiting = True  # the staging folder is about to be renamed away: push the final folder
            return
        super()._push_from_checkpoint(checkpoint_folder)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, f"{STAGING_PREFIX}{name}")
        if self.args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)  # left by a run killed while saving
        self.accelerator.wait_for_everyone()
        os.makedirs(staging, exist_ok=True)
        self._checkpoint_staging, self._push_waiting = staging, False
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging = None
        self.accelerator.wait_for_everyone()
        final = os.path.join(run_dir, name)
        if self.args.should_save:
            replace_folder(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            best = self.state.best_model_checkpoint
            if best and best.startswith(staging):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        if self._push_waiting:
            self._push_waiting = False
            self._push_from_checkpoint(final)
        self.accelerator.wait_for_everyone()


__all__ = ["STAGING_PREFIX", "AtomicCheckpointsMixin"]
