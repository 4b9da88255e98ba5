"""The Trainer side every recipe shares: ``TrainingArguments``, which experiment trackers ``report_to`` names, what
``resume_from_checkpoint`` means (``true``: the newest checkpoint Trainer finished writing; a folder torn by a kill
mid-save is skipped), saving the adapter (returns its bytes) and peak memory."""

from __future__ import annotations

import os
from pathlib import Path

from recipes.cli import RecipeError
from recipes.models import make_saveable
from recipes.paths import resolve_path


def training_arguments(output_dir: str | os.PathLike, **fields):
    """``transformers.TrainingArguments`` for a recipe's run: its own ``fields`` over the settings every recipe here
    shares (columns kept for the collators, no experiment trackers unless asked, every trainable parameter used in
    every forward under DDP, the CPU when there is no GPU)."""
    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    shared = dict(remove_unused_columns=False, report_to="none", ddp_find_unused_parameters=False, use_cpu=not cuda,
                  dataloader_pin_memory=cuda)
    if "report_to" in fields:
        fields["report_to"] = report_targets(fields["report_to"]) or "none"
    return TrainingArguments(output_dir=str(output_dir), **{**shared, **fields})


# The help text of every recipe's ``report_to`` key.
REPORT_TO_HELP = ("experiment trackers that receive the training logs, as Trainer's report_to: none, all (every "
                  "installed one), or names such as tensorboard, wandb, mlflow, trackio (comma-separated)")
# pip packages of the trackers whose package name differs from the report_to name or is commonly asked for.
_TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                     "trackio": "trackio", "clearml": "clearml", "neptune": "neptune", "dvclive": "dvclive",
                     "codecarbon": "codecarbon", "swanlab": "swanlab", "dagshub": "dagshub", "flyte": "flytekit",
                     "azure_ml": "azureml-core"}


def report_targets(report_to: str | list[str] | None) -> list[str]:
    """The trackers ``report_to`` names, checked: ``[]`` for none, the installed ones for ``all``, else the names
    (a comma-separated string or a list). :class:`RecipeError` for an unknown name or one whose package is not
    installed, before any model loads (Trainer would only fail when it is built, after loading and base scoring)."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    names = report_to if isinstance(report_to, (list, tuple)) else str(report_to or "none").split(",")
    names = [n.strip() for n in names if n and n.strip()]
    if not names or names == ["none"]:
        return []
    installed = get_available_reporting_integrations()
    if names == ["all"]:
        return list(installed)
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            raise RecipeError(f"report_to '{name}' is not a tracker Trainer knows: choose none, all, or any of "
                              f"{', '.join(INTEGRATION_TO_CALLBACK)}")
        if name not in installed:
            raise RecipeError(f"report_to '{name}' needs its package: pip install {_TRACKER_PACKAGES.get(name, name)} "
                              f"(installed trackers: {', '.join(installed) or 'none'}), or set report_to: none")
    return names


def report_metrics(report_to: str | list[str] | None, output_dir: str | os.PathLike, metrics: dict[str, float],
                   step: int = 0) -> list[str]:
    """Send ``metrics`` to the trackers ``report_to`` names, for a recipe that scores without training (Trainer does
    this itself for the ones that train): each tracker's own Trainer callback is started, given the metrics as one
    log entry at ``step``, and closed, so they land where that tracker puts a Trainer run's logs (TensorBoard:
    ``output_dir/runs``). Returns the trackers used."""
    names = report_targets(report_to)
    if not names:
        return []
    from transformers import TrainerControl, TrainerState
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    args = training_arguments(output_dir, report_to=names)
    state = TrainerState(global_step=step)
    for name in names:
        callback, control = INTEGRATION_TO_CALLBACK[name](), TrainerControl()
        callback.on_train_begin(args, state, control)
        callback.on_log(args, state, control, logs=dict(metrics))
        callback.on_train_end(args, state, control)
    return names


def save_adapter(model, output_dir: str | os.PathLike) -> int:
    """Save the trained adapter (or the full model for ``full``) and return the bytes of its weight files.

    Saved with :func:`peft_nola.save_pretrained_atomic`: an interrupted save leaves the previous files complete.
    """
    from peft_nola import save_pretrained_atomic

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = getattr(model, "get_base_model", lambda: model)()
    make_saveable(base)
    save_pretrained_atomic(model, out, **_embedding_kwargs(model))
    weight_files = [p for p in out.iterdir() if p.suffix in (".safetensors", ".bin")]
    return sum(p.stat().st_size for p in weight_files)


def _embedding_kwargs(model) -> dict:
    """``save_embedding_layers=False`` for an adapter that adapts no embedding: peft's default ("auto") then looks
    the base model up on the hub to see whether the vocabulary was resized (recipes never resize it), which offline
    prints two warnings on every save."""
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    config = getattr(model, "peft_config", {}).get("default")
    targets = getattr(config, "target_modules", None)
    if config is None or not isinstance(targets, (set, list, tuple)):
        return {}
    return {} if set(targets) & set(EMBEDDING_LAYER_NAMES) else {"save_embedding_layers": False}


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest ``checkpoint-N`` folder in ``output_dir`` that Trainer finished writing, or None.

    Trainer writes ``trainer_state.json`` last, so a run killed while saving leaves a folder without it; Trainer's
    own ``resume_from_checkpoint=True`` would pick that torn folder and fail (or resume from a half-written state).
    """
    complete = [p for p in Path(output_dir).glob("checkpoint-*")
                if p.name.split("-", 1)[1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(complete, key=lambda p: int(p.name.split("-", 1)[1]), default=None)


def resume_checkpoint(value: str | bool | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint folder ``resume_from_checkpoint: value`` resumes from, or None to start afresh.

    ``true`` is the newest complete checkpoint in ``output_dir``; anything else names a folder. Raises
    :class:`RecipeError` when there is no such checkpoint, so recipes call it before any work starts.
    """
    if value in (None, False, "", "false", "False"):
        return None
    if value in (True, "true", "True"):
        latest = latest_complete_checkpoint(output_dir)
        if latest is None:
            raise RecipeError(f"resume_from_checkpoint: true, but {output_dir} holds no complete checkpoint-* folder "
                              "(one with a trainer_state.json): train with save_strategy steps/epoch first, or pass "
                              "a checkpoint folder")
        return str(latest)
    if not resolve_path(value).is_dir():
        raise RecipeError(f"resume_from_checkpoint folder not found: {value}")
    return str(resolve_path(value))


def peak_memory_bytes() -> int:
    """Peak accelerator memory allocated (CUDA) or the process's peak resident set size (CPU)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB.
