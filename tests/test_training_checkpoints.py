"""Atomic trainer checkpoints and their Hub upload (``push_to_hub=True``), against a local fake Hub.

The fake Hub stands in for ``huggingface_hub.HfApi``: ``upload_folder(run_as_future=True)`` returns a future that,
like the real one, reads the folder in a background thread once the upload starts (here after a short delay, the
time a real upload takes to get going) and copies what it reads into a local "repository" folder.
"""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from huggingface_hub.utils import filter_repo_objects
from test_training_trainer import SyntheticTask


class LocalHub:
    """Uploads into ``root/<repo>/<path_in_repo>``, each in the background after ``delay`` seconds."""

    def __init__(self, root: Path, delay: float = 0.3) -> None:
        self.root, self.delay = root, delay
        self.pool = ThreadPoolExecutor(max_workers=4)
        self.futures: list[Future] = []
        self.lock = threading.Lock()

    def create_repo(self, repo_id: str, **kwargs: Any) -> SimpleNamespace:
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(
        self,
        repo_id: str,
        folder_path: str,
        path_in_repo: str | None = None,
        run_as_future: bool = False,
        ignore_patterns: list[str] | None = None,
        **kwargs: Any,
    ) -> Future:
        def upload() -> list[str]:
            time.sleep(self.delay)
            folder = Path(folder_path)
            if not folder.is_dir():
                raise FileNotFoundError(f"the folder to upload is gone: {folder}")
            files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
            files = list(filter_repo_objects(files, ignore_patterns=ignore_patterns))
            destination = self.root / repo_id / (path_in_repo or "")
            for name in files:
                target = destination / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / name, target)
            return files

        assert run_as_future, "the Trainer uploads in the background"
        future = self.pool.submit(upload)
        with self.lock:
            self.futures.append(future)
        return future


@pytest.mark.slow
def test_hub_strategy_checkpoint_uploads_the_complete_checkpoint(tmp_path, monkeypatch):
    import transformers.trainer

    hub = LocalHub(tmp_path / "hub")
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    output_dir = tmp_path / "run"
    trainer = SyntheticTask().trainer(
        output_dir,
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        push_to_hub=True,
        hub_model_id="local/sprm-run",
        hub_strategy="checkpoint",
        hub_always_push=True,
    )
    trainer.train()
    uploaded = [future.result(timeout=60) for future in hub.futures]  # re-raises an upload's error

    repo = tmp_path / "hub" / "local" / "sprm-run"
    checkpoint = output_dir / "checkpoint-2"
    pushed = repo / "last-checkpoint"
    local_files = sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file())
    pushed_files = sorted(p.relative_to(pushed).as_posix() for p in pushed.rglob("*") if p.is_file())
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json", "scheduler.pt"} <= set(local_files)
    assert pushed_files == local_files
    for name in local_files:
        assert (pushed / name).read_bytes() == (checkpoint / name).read_bytes(), name
    # nothing from a staging folder ever reached the Hub
    assert not any("partial" in name for files in uploaded for name in files)
    assert not any("partial" in p.name for p in repo.rglob("*"))
    assert not any("partial" in p.name for p in output_dir.iterdir())
