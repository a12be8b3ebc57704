"""Saving complete checkpoints (weights, config, code, tokenizer, model card) and pushing them to the Hub.

Every folder is written to a temporary sibling first and renamed into place once complete: an interrupted
save never leaves a half-written checkpoint, and an existing folder is replaced only when asked to.

The model card carries evaluation results twice: as a readable table, and as ``model-index`` metadata in its YAML
front matter (built with ``huggingface_hub.ModelCardData`` / ``EvalResult``), which the Hub shows as evaluation
results and leaderboards read. :func:`eval_results_from_report` turns a ``metastone eval`` report into the latter.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic_writes import atomic_output_dir
from .math_datasets import MATH_DATASETS
from .modeling_metastone import MetaStoneForCausalLMWithSPRM

if TYPE_CHECKING:
    from huggingface_hub import EvalResult, ModelCard

DEFAULT_TRAINING_RECIPE = (
    "Joint GRPO (policy) + self-supervised process reward (SPR) loss (head), outcome rewards only: "
    "per-step BCE against the trajectory's outcome, kept only where the head already agrees with it, "
    "class-balanced (positive factor 1.5); features reach the head with the backbone gradient scaled by 1e-4; "
    "head learning rate 1e-5, policy 1e-6, AdamW (weight decay 0.01), gradient clipping 1.0."
)


OFFICIAL_REPOSITORY = "https://github.com/MetaStone-AI/MetaStone-S1"
"""The official MetaStone-S1 release (training and evaluation code, links to its checkpoints)."""

EVAL_TASK_TYPE = "text-generation"
EVAL_TASK_NAME = "Text Generation"


@dataclass(frozen=True)
class EvalDataset:
    """The benchmark results were measured on: the ``dataset`` of a ``model-index`` entry.

    ``type`` is the dataset's Hub id when it has one (the Hub links to it), otherwise a short identifier.
    """

    name: str
    """Display name, e.g. ``"MATH-500"``."""
    type: str
    """Hub dataset id, e.g. ``"HuggingFaceH4/MATH-500"``, or a short identifier for a dataset not on the Hub."""
    split: str | None = None
    """The split evaluated, e.g. ``"test"``."""
    config: str | None = None
    """The dataset configuration (subset), e.g. ``"main"`` for GSM8K."""


KNOWN_EVAL_DATASETS: dict[str, EvalDataset] = {
    name: EvalDataset(spec.title, spec.hub_id, split=spec.split, config=spec.config)
    for name, spec in MATH_DATASETS.items()
}
"""The benchmarks ``metastone eval --data NAME`` knows by name: their Hub dataset, configuration and split."""

# `summarize` names its metrics `pass@1`, `<method>@<N>` or `<method>@<N> (<effort>)`.
_METRIC_KEY = re.compile(r"^(?P<method>[a-z_]+)@(?P<n>\d+)(?: \((?P<effort>[^)]+)\))?$")
_AUC_NAME = "SPRM AUC"


def resolve_eval_dataset(dataset: str | Path | EvalDataset) -> EvalDataset:
    """``dataset`` as an :class:`EvalDataset`.

    Accepts an :class:`EvalDataset`, a name in :data:`KNOWN_EVAL_DATASETS` (``"math500"``: its Hub dataset and
    split), or any other name or data file path, which becomes a dataset of that name (the file name without its
    extension for a path) and no split.
    """
    if isinstance(dataset, EvalDataset):
        return dataset
    text = str(dataset).strip()
    if not text:
        raise ValueError("The evaluation dataset name is empty.")
    if text in KNOWN_EVAL_DATASETS:
        return KNOWN_EVAL_DATASETS[text]
    path = Path(text)
    name = path.stem if path.suffix in (".jsonl", ".json", ".parquet") else text
    return EvalDataset(name=name, type=name)


def report_summary(report: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """The summary of a ``metastone eval`` report: from ``eval_report.json``'s path, its parsed dict or the summary."""
    if isinstance(report, (str, Path)):
        report = json.loads(Path(report).read_text(encoding="utf-8"))
    if not isinstance(report, Mapping):
        raise ValueError("An evaluation report must be a JSON object with a `summary` (or be the summary itself).")
    summary = dict(report.get("summary", report))
    if not isinstance(summary.get("metrics"), Mapping):
        raise ValueError("The evaluation report has no `metrics`; give the eval_report.json `metastone eval` wrote.")
    return summary


def report_metrics(report: Mapping[str, Any] | str | Path) -> dict[str, float]:
    """A report's metrics as ``name -> value`` for the card's plain table: mean accuracies as fractions, SPRM AUC."""
    summary = report_summary(report)
    metrics = {name: round(float(entry["mean"]), 4) for name, entry in summary["metrics"].items()}
    auc = summary.get("sprm_auc")
    if auc is not None and math.isfinite(auc):
        metrics[_AUC_NAME] = round(float(auc), 4)
    return metrics


def eval_results_from_report(
    report: Mapping[str, Any] | str | Path, dataset: str | Path | EvalDataset | None = None
) -> list[EvalResult]:
    """The ``model-index`` results of a ``metastone eval`` report, one ``huggingface_hub.EvalResult`` per metric.

    Accuracies (``pass@1`` and, for every N, ``random@N``, ``majority@N``, ``sprm_vote@N``, ``bon_sprm@N``, and
    ``beam@N`` / ``dvts@N`` when those searches ran; the effort is part of the name, as in the report) are given in
    percent with metric type ``accuracy``; the SPRM AUC (``roc_auc``) as a fraction, and left out when undefined.
    Each metric's ``args`` record N, the effort, the number of questions and of samples per question, the tokens
    generated per question (when the report has them) and the bootstrap interval in the metric's unit; its
    ``config`` names the sampling protocol (with the settings that were overridden, if any).

    Args:
        report: ``eval_report.json``'s path, its parsed dict, or its ``summary``.
        dataset: what was measured, see :func:`resolve_eval_dataset`; default: the summary's ``dataset`` field.

    Raises:
        ValueError: when neither ``dataset`` nor the report says which dataset was measured.
    """
    from huggingface_hub import EvalResult

    summary = report_summary(report)
    named = dataset if dataset is not None else summary.get("dataset")
    if not named:
        raise ValueError(
            "The evaluation report does not say which dataset it measured; name it "
            f"(one of {sorted(KNOWN_EVAL_DATASETS)}, or any name)."
        )
    measured = resolve_eval_dataset(named)
    protocol = summary.get("protocol") or {}
    config = None
    if protocol.get("name"):
        overridden = protocol.get("overridden") or []
        config = str(protocol["name"]) + (f" (overridden: {', '.join(overridden)})" if overridden else "")
    counts = {key: int(summary[key]) for key in ("questions", "samples_per_question") if summary.get(key) is not None}
    confidence = summary.get("confidence")

    def result(name: str, metric_type: str, value: float, args: dict[str, Any]) -> EvalResult:
        return EvalResult(
            task_type=EVAL_TASK_TYPE,
            task_name=EVAL_TASK_NAME,
            dataset_type=measured.type,
            dataset_name=measured.name,
            dataset_config=measured.config,
            dataset_split=measured.split,
            metric_type=metric_type,
            metric_value=value,
            metric_name=name,
            metric_config=config,
            metric_args={**args, **counts} or None,
        )

    results = []
    for name, entry in summary["metrics"].items():
        mean = float(entry["mean"])
        if not math.isfinite(mean):
            continue
        args: dict[str, Any] = {}
        match = _METRIC_KEY.match(name)
        if match:
            args["n"] = int(match["n"])
            if match["effort"]:
                args["reasoning_effort"] = match["effort"]
        if entry.get("tokens_per_question") is not None:
            args["tokens_per_question"] = round(float(entry["tokens_per_question"]), 1)
        for extra in ("decode_steps_per_question", "candidates_per_question"):  # adaptive compute (and Best-of-N)
            if entry.get(extra) is not None:
                args[extra] = round(float(entry[extra]), 1)
        if entry.get("n") is not None and "n" not in args:
            args["n"] = int(entry["n"])
        low, high = entry.get("ci_low"), entry.get("ci_high")
        if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
            args["confidence_interval"] = [round(100 * float(low), 2), round(100 * float(high), 2)]
            if confidence is not None:
                args["confidence"] = float(confidence)
        results.append(result(name, "accuracy", round(100 * mean, 2), args))
    auc = summary.get("sprm_auc")
    if auc is not None and math.isfinite(auc):
        results.append(result(_AUC_NAME, "roc_auc", round(float(auc), 4), {}))
    return results


def card_base_model(folder: str | Path) -> str | list[str] | None:
    """The ``base_model`` recorded in the model card (``README.md``) of a checkpoint folder, if any."""
    import yaml
    from huggingface_hub import ModelCard

    path = Path(folder) / "README.md"
    if not path.is_file():
        return None
    try:
        return ModelCard.load(path, ignore_metadata_errors=True).data.base_model
    except (ValueError, yaml.YAMLError):  # front matter that does not parse: nothing recorded
        return None


def render_model_card(
    model: MetaStoneForCausalLMWithSPRM,
    *,
    repo_id: str | None = None,
    base_model: str | list[str] | None = None,
    metrics: Mapping[str, Any] | None = None,
    eval_results: Sequence[EvalResult] | None = None,
    training: str | None = None,
    notes: str | None = None,
    datasets: list[str] | None = None,
) -> ModelCard:
    """Render the package's model card template (``templates/model_card.md``) for ``model``.

    Args:
        repo_id: the Hub repository the card is for (its name becomes the model's name).
        base_model: Hub id(s) of the model this one was trained or converted from (``base_model`` metadata).
        metrics: ``name -> value`` rows of a plain results table, as given (no dataset, so no ``model-index``).
        eval_results: ``huggingface_hub.EvalResult`` objects (see :func:`eval_results_from_report`): written as the
            card's ``model-index`` metadata and as one readable table per dataset.
        training: the training recipe paragraph (default: :data:`DEFAULT_TRAINING_RECIPE`).
        notes: a paragraph under the introduction.
        datasets: Hub ids of the training datasets (``datasets`` metadata).

    Returns the ``huggingface_hub.ModelCard``.
    """
    from huggingface_hub import ModelCard, ModelCardData

    config = model.config
    text = config.text_config
    model_name = repo_id.split("/")[-1] if repo_id else "MetaStone-S1 (metastone-hf)"
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        license="apache-2.0",
        base_model=base_model,
        datasets=datasets,
        pipeline_tag="text-generation",
        tags=["metastone", "reasoning", "process-reward-model", "best-of-n", "grpo", "custom_code"],
        eval_results=list(eval_results) if eval_results else None,
    )
    head_parameters = sum(p.numel() for p in model.sprm_head.parameters())
    template = resources.files("metastone_hf").joinpath("templates/model_card.md").read_text(encoding="utf-8")
    card = ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=model_name,
        repo_id=repo_id or "path/to/this/checkpoint",
        base_model=[base_model] if isinstance(base_model, str) else (base_model or []),
        official_repository=OFFICIAL_REPOSITORY,
        backbone=text.model_type,
        num_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        head_parameters=f"{head_parameters:,}",
        feature_layer=config.sprm_feature_layer,
        efforts=sorted(config.reasoning_effort_presets.items(), key=lambda item: item[1]),
        metrics=[(k, _format_metric(v)) for k, v in (metrics or {}).items()],
        result_sections=_result_sections(eval_results or []),
        step_token_ids=config.step_token_ids,
        training=training or DEFAULT_TRAINING_RECIPE,
        notes=notes,
    )
    card.text = card.text.rstrip("\n") + "\n"  # the template engine drops the final newline
    return card


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


def save_backbone(
    model: MetaStoneForCausalLMWithSPRM,
    output_dir: str | Path,
    tokenizer: Any | None = None,
    *,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write the backbone alone, as the plain causal LM it is (``Qwen2ForCausalLM``, ...), atomically.

    The folder (config, generation config, safetensors weights without ``sprm_head.*``, the tokenizer when given)
    loads with ``AutoModelForCausalLM`` without remote code, and is what vLLM serves: ``trl vllm-serve --model
    <output_dir>`` for GRPO + SPR training with ``use_vllm=True, vllm_mode="server"`` (the trainer then syncs only
    these weights into vLLM at every step). Merge LoRA adapters first (``merge_and_unload``).
    """
    import copy

    from huggingface_hub import save_torch_state_dict
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    # The class loaded with trust_remote_code is the checkpoint's own copy of the model, not this package's.
    if not hasattr(model, "sprm_head") or not hasattr(getattr(model, "config", None), "text_config"):
        raise TypeError(
            f"save_backbone needs a MetaStone model (with `sprm_head` and `config.text_config`), got "
            f"{type(model).__name__}; merge PEFT adapters first (`model = model.merge_and_unload()`)."
        )
    text_config = copy.deepcopy(model.config.text_config)
    text_config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[text_config.model_type]]
    state = {name: t for name, t in model.state_dict().items() if not name.startswith("sprm_head.")}
    if text_config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied to the input embedding, which the plain model re-ties on load
    with atomic_output_dir(output_dir, overwrite=overwrite) as staging:
        text_config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        save_torch_state_dict(state, staging, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
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


def _result_sections(eval_results: Sequence[EvalResult]) -> list[dict[str, Any]]:
    """One readable table per dataset: its title, a line on what was measured, and (metric, value, interval) rows."""
    sections: dict[tuple[Any, ...], dict[str, Any]] = {}
    for result in eval_results:
        key = (result.dataset_name, result.dataset_type, result.dataset_config, result.dataset_split)
        if key not in sections:
            args = result.metric_args or {}
            source = f"`{result.dataset_type}`"
            if result.dataset_config:
                source += f", config `{result.dataset_config}`"
            if result.dataset_split:
                source += f", split `{result.dataset_split}`"
            details = [source]
            if "questions" in args and "samples_per_question" in args:
                details.append(f"{args['questions']} questions x {args['samples_per_question']} samples per question")
            if result.metric_config:
                details.append(f"sampling protocol `{result.metric_config}`")
            confidence = args.get("confidence")
            interval = f"{round(100 * confidence)}% bootstrap interval" if confidence is not None else "interval"
            sections[key] = {
                "title": result.dataset_name,
                "details": "; ".join(details),
                "interval": interval,
                "rows": [],
            }
        interval = (result.metric_args or {}).get("confidence_interval")
        unit = "%" if result.metric_type == "accuracy" else ""
        sections[key]["rows"].append(
            (
                result.metric_name or result.metric_type,
                f"{result.metric_value}{unit}",
                f"[{interval[0]}, {interval[1]}]" if interval else "",
            )
        )
    return list(sections.values())
