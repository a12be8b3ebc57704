"""Saving complete checkpoints (weights, config, code, tokenizer, model card) and pushing them to the Hub.

Every folder is written to a temporary sibling first and renamed into place once complete: an interrupted
save never leaves a half-written checkpoint, and an existing folder is replaced only when asked to.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from .modeling_metastone import MetaStoneForCausalLMWithSPRM

DEFAULT_TRAINING_RECIPE = (
    "Joint GRPO (policy) + self-supervised process reward (SPR) loss (head), outcome rewards only: "
    "per-step BCE against the trajectory's outcome, kept only where the head already agrees with it, "
    "class-balanced (positive factor 1.5); features reach the head with the backbone gradient scaled by 1e-4; "
    "head learning rate 1e-5, policy 1e-6, AdamW (weight decay 0.01), gradient clipping 1.0."
)


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh staging folder; on success it replaces ``output_dir`` in one rename.

    Raises ``FileExistsError`` up front when ``output_dir`` exists and ``overwrite`` is false. On any error
    inside the block the staging folder is removed and ``output_dir`` is left exactly as it was.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(
            f"{output_dir} already exists; choose another folder or pass overwrite=True (--overwrite) to replace it."
        )
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} exists and is not a folder; refusing to replace it.")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        yield staging
        if output_dir.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            os.replace(output_dir, backup / "old")
            os.replace(staging, output_dir)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def render_model_card(
    model: MetaStoneForCausalLMWithSPRM,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    training: str | None = None,
    notes: str | None = None,
    datasets: list[str] | None = None,
) -> Any:
    """Render the package's model card template (``templates/model_card.md``) for ``model``.

    Returns a ``huggingface_hub.ModelCard``; ``metrics`` (name -> value) fill the results table.
    """
    from huggingface_hub import ModelCard, ModelCardData

    config = model.config
    text = config.text_config
    card_data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        base_model=base_model,
        datasets=datasets,
        pipeline_tag="text-generation",
        tags=["metastone", "reasoning", "process-reward-model", "best-of-n", "grpo", "custom_code"],
    )
    head_parameters = sum(p.numel() for p in model.sprm_head.parameters())
    template = resources.files("metastone_hf").joinpath("templates/model_card.md").read_text(encoding="utf-8")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=repo_id.split("/")[-1] if repo_id else "MetaStone-S1 (metastone-hf)",
        repo_id=repo_id or "path/to/this/checkpoint",
        backbone=text.model_type,
        num_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        head_parameters=f"{head_parameters:,}",
        feature_layer=config.sprm_feature_layer,
        efforts=sorted(config.reasoning_effort_presets.items(), key=lambda item: item[1]),
        metrics=[(k, _format_metric(v)) for k, v in (metrics or {}).items()],
        step_token_ids=config.step_token_ids,
        training=training or DEFAULT_TRAINING_RECIPE,
        notes=notes,
    )


def write_model_card(model: MetaStoneForCausalLMWithSPRM, folder: str | Path, **card_kwargs: Any) -> Path:
    """Render the model card and write it as ``folder/README.md``."""
    path = Path(folder) / "README.md"
    render_model_card(model, **card_kwargs).save(path)
    return path


def save_checkpoint(
    model: MetaStoneForCausalLMWithSPRM,
    output_dir: str | Path,
    tokenizer: Any | None = None,
    *,
    overwrite: bool = False,
    **card_kwargs: Any,
) -> Path:
    """Write a complete, Hub-ready checkpoint folder atomically.

    Contents: safetensors weights, ``config.json`` with ``auto_map``, the remote-code files,
    ``generation_config.json``, the tokenizer (when given) and a rendered model card ``README.md``.
    ``card_kwargs`` go to [`render_model_card`].
    """
    with atomic_output_dir(output_dir, overwrite=overwrite) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_model_card(model, staging, **card_kwargs)
    return Path(output_dir)


def push_checkpoint(
    model: MetaStoneForCausalLMWithSPRM,
    repo_id: str,
    tokenizer: Any | None = None,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload MetaStone-S1 checkpoint (metastone-hf)",
    **card_kwargs: Any,
) -> Any:
    """Save a complete checkpoint (see [`save_checkpoint`]) to a temporary folder and upload it to ``repo_id``.

    Returns the ``CommitInfo`` of the upload.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_checkpoint(model, Path(tmp) / "checkpoint", tokenizer, repo_id=repo_id, **card_kwargs)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)


def _format_metric(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
