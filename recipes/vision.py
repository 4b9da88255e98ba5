"""Few-shot image classification with ViT: NOLA (MLP or QV), LoRA, linear probe, full fine-tuning and 1-NN; the
protocol of the NOLA paper's Tables 6, 7 and 10.

    python -m recipes.vision --config configs/vision/vitb_cifar10_5shot_nola_mlp.yaml \\
        --model_name_or_path /models/vit-base-patch16-224 --data_dir /data/cifar10
    python -m recipes.vision --config configs/vision/smoke.yaml --output_dir /tmp/vision_smoke   # offline, CPU

Protocol (per shot count and method): ``sample_sets`` k-shot training sets drawn without replacement from the
train split (disjoint from a per-class validation hold-out) x ``inits`` initialisations of the classifier head /
adapter / data order; the learning rate is chosen from the method's grid by top-1 on the validation hold-out
(``lr_search_runs`` runs per candidate), then every run trains ``epochs`` epochs with ``transformers.Trainer`` (Adam,
cosine to 1e-6, label smoothing 0.1, as the paper's code) and is scored by top-1 on the test split at the final epoch.
The classifier head is trained by every method and excluded from the trainable-parameter counts, as in the paper.
1-NN classifies test images by cosine similarity of the frozen model's classifier-input features to the k-shot
images (no training, so only the sample sets vary).

Writes ``results.json`` (mean and population std of top-1 in percent over the runs, per method and shot count, with
every run), ``results.md`` (Table 6's layout) and ``runs/`` (one JSON per finished run: re-running the same command
skips finished runs, so an interrupted protocol resumes where it stopped).
"""

from __future__ import annotations

import copy
import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from peft_nola.tuners.lowrank import names_module
from recipes.cli import RecipeError, run_cli
from recipes.config import AdapterArgs, ModelArgs, config_to_dict, load_config
from recipes.methods import build_peft_config
from recipes.models import split_model_config
from recipes.paths import locate, resolve_data_path, resolve_path
from recipes.results import markdown_table, write_results
from recipes.console import use_console
from recipes.training import REPORT_TO_HELP, latest_complete_checkpoint, peak_memory_bytes, report_targets
from recipes.training import save_adapter, training_arguments
from recipes.vision_data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    ImageTransform,
    LabeledImages,
    TransformedImages,
    collate_images,
    holdout_indices,
    kshot_indices,
    load_splits,
)

# method name -> (kind, target roles, LoRA/NOLA rank or None for "auto", table label)
METHOD_PRESETS: dict[str, dict] = {
    "full": dict(kind="full", label="Full-FT"),
    "linear": dict(kind="linear", label="Linear"),
    "knn": dict(kind="knn", label="1-NN"),
    "lora_r4": dict(kind="lora", targets=("q", "k", "v"), r=4, label="LoRA (r=4)"),
    "lora_r1": dict(kind="lora", targets=("q", "k", "v"), r=1, label="LoRA (r=1)"),
    # The paper's Table 6 LoRA rows (141K / 375K printed as n / 2**20 M) are r=4 on Q and V only: 147,456 / 393,216.
    "lora_qv_r4": dict(kind="lora", targets=("q", "v"), r=4, label="LoRA-QV (r=4)"),
    "lora_qv_r1": dict(kind="lora", targets=("q", "v"), r=1, label="LoRA-QV (r=1)"),
    "nola_mlp": dict(kind="nola", targets=("fc1", "fc2"), r=None, label="NOLA-MLP"),
    "nola_qv": dict(kind="nola", targets=("q", "v"), r=None, label="NOLA-QV"),
    "nora_mlp": dict(kind="nora", targets=("fc1", "fc2"), r=None, label="NoRA-MLP"),
}

# Module-name suffixes per role (transformers >= 5 ViT naming; 4.x's attention.query/key/value as a fallback).
TARGET_NAMES = {
    "q": ("q_proj", "query"),
    "k": ("k_proj", "key"),
    "v": ("v_proj", "value"),
    "fc1": ("fc1",),
    "fc2": ("fc2",),
}


@dataclass
class VisionConfig(ModelArgs):
    """The few-shot vision recipe: model, data, protocol, adapters and run control."""

    # ---- model: a checkpoint (path or hub name; supervised ViT or MAE ViTMAE weights) or model_config (tests)
    model_name_or_path: str = field(default="google/vit-base-patch16-224-in21k", metadata={"help": (
        "The ViT checkpoint: a local directory or hub name; supervised ViT or MAE (ViTMAE) weights.")})
    keep_pretrained_head: bool = field(default=False, metadata={"help": (
        "Keep the checkpoint's classification head (its size must equal the dataset's class count) instead of a "
        "new one.")})
    num_labels: int | None = field(default=None, metadata={"help": (
        "Class count the model must have; a mismatch with the dataset is an error (null: the dataset's).")})
    head_module: str = field(default="classifier", metadata={"help": (
        "Name of the classification head (trained by every method, left out of the parameter counts).")})
    image_mean: list[float] | None = field(default=None, metadata={"help": (
        "Normalisation mean per channel; null: the checkpoint's image processor, else ImageNet statistics.")})
    image_std: list[float] | None = field(default=None, metadata={"help": (
        "Normalisation std per channel; null as image_mean.")})
    model_label: str | None = field(default=None, metadata={"help": (
        "Model name in the table (ViT-B, ViT-L, ViT-B-MAE); derived from the model's config when null.")})
    # ---- data
    dataset: str = field(default="cifar10", metadata={"help": "Dataset name in the table."})
    data_dir: str | None = field(default=None, metadata={"help": (
        "The images: an image folder with train/<class>/<image> and test/<class>/<image> (one subfolder per class, "
        "as datasets' imagefolder), tar files of such trees, a datasets save_to_disk folder or parquet files. Found "
        "by the data rule: as given, else under $PEFT_NOLA_DATA_DIR or ../shared/data. It wins over hub_dataset; "
        "pass none to use hub_dataset.")})
    hub_dataset: str | None = field(default=None, metadata={"help": (
        "A Hugging Face datasets image dataset (hub name, needs internet, or a local datasets folder) used when "
        "data_dir is null.")})
    hub_config: str | None = field(default=None, metadata={"help": "Configuration name of hub_dataset."})
    train_split: str = field(default="train", metadata={"help": "Split (or folder) the k-shot sets are drawn from."})
    test_split: str | None = field(default=None, metadata={"help": (
        "Split (or folder) scored; null: test (or val / validation folders).")})
    image_column: str | None = field(default=None, metadata={"help": (
        "hub_dataset: column holding the image (null: image, img or pixel_values).")})
    label_column: str | None = field(default=None, metadata={"help": (
        "hub_dataset: column holding the class (null: label, labels, fine_label or coarse_label).")})
    train_list: str | None = field(default=None, metadata={"help": (
        "A split list file (Caltech-101 train.txt) naming the training images, relative to data_dir.")})
    test_list: str | None = field(default=None, metadata={"help": "As train_list, for the test images."})
    exclude_classes: list[str] = field(default_factory=list, metadata={"help": (
        "Classes to drop, e.g. [BACKGROUND_Google] for Caltech-101.")})
    max_test_per_class: int | None = field(default=None, metadata={"help": (
        "Evaluate on the first this many test images of each class (null: all).")})
    # ---- protocol (paper: 5/10 shots, 4 sample sets x 3 inits, 50 epochs, batch 64)
    methods: list[str] = field(default_factory=lambda: ["nola_mlp"], metadata={"help": (
        "Methods to run: " + ", ".join(METHOD_PRESETS) + ".")})
    shots: list[int] = field(default_factory=lambda: [5, 10], metadata={"help": "Training images per class."})
    sample_sets: int = field(default=4, metadata={"help": "k-shot training sets drawn per shot count (paper: 4)."})
    inits: int = field(default=3, metadata={"help": "Initialisations per sample set (paper: 3)."})
    sampling_seed: int = field(default=0, metadata={"help": "Sample set s uses seed sampling_seed + s."})
    init_seed: int = field(default=0, metadata={"help": (
        "Init i uses seed init_seed + i (head, adapter init, data order, augmentation).")})
    val_per_class: int = field(default=10, metadata={"help": (
        "Validation hold-out per class, drawn from the train split and never in a k-shot set; it picks the "
        "learning rate.")})
    validation_seed: int = field(default=1000, metadata={"help": "Seed of the validation hold-out."})
    lr_grid: list[float] = field(default_factory=lambda: [5e-3, 1e-3, 5e-4], metadata={"help": (
        "Learning rates tried for LoRA, NOLA, NoRA and the linear probe.")})
    lr_grid_full: list[float] = field(default_factory=lambda: [8e-5, 5e-5, 3e-5, 1e-5], metadata={"help": (
        "Learning rates tried for full fine-tuning.")})
    lr_search_runs: int = field(default=1, metadata={"help": (
        "(sample set, init) pairs averaged per candidate learning rate.")})
    epochs: int = field(default=50, metadata={"help": "Training epochs per run (paper: 50)."})
    batch_size: int = field(default=64, metadata={"help": "Training batch (paper: 64)."})
    eval_batch_size: int = field(default=256, metadata={"help": "Images scored per batch."})
    augment: str = field(default="paper", metadata={"help": (
        "Training augmentation: paper (the NOLA ViT pipeline: random resized crop, colour jitter, grayscale, blur, "
        "flip), flip (resize and flip) or none.")})
    label_smoothing: float = field(default=0.1, metadata={"help": "Label smoothing of the loss."})
    min_lr: float = field(default=1e-6, metadata={"help": "Cosine schedule's final learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam weight decay."})
    warmup_steps: int = field(default=0, metadata={"help": "Warm-up steps of the learning rate."})
    # ---- NOLA / LoRA
    nola_r: int | None = field(default=None, metadata={"help": (
        "NOLA's rank; null: 4 for ViT-B (hidden <= 768), 1 for larger (ViT-L), as in the paper.")})
    # k = l = 1024 as the authors' ViT script; the paper prints n / 2**20 as "K", so 24 x 2048 = 49,152 is its
    # "47K" (ViT-B) and 48 x 2048 = 98,304 its "94K" (ViT-L).
    num_basis_A: int = field(default=1024, metadata={"help": "NOLA: basis matrices combined into A (k)."})
    num_basis_B: int = field(default=1024, metadata={"help": "NOLA: basis matrices combined into B (l)."})
    nola_alpha: float = field(default=1.0, metadata={"help": (
        "NOLA: scaling c; the update is scaled by c / r (the authors' ViT layer uses c = 1).")})
    basis_seed: int = field(default=0, metadata={"help": "NOLA: seed that regenerates the random bases."})
    basis_mode: str = field(default="shared", metadata={"help": (
        "NOLA basis storage: shared (one basis per shape, as the authors' ViT layer, which reseeds before each "
        "layer; also the fastest), per_layer or per_layer_cached.")})
    lora_alpha: float | None = field(default=None, metadata={"help": (
        "LoRA: scaling numerator; null: equal to r (scale 1, as the paper's ViT LoRA).")})
    adapter_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    # ---- run control
    output_dir: str = field(default="runs/vision", metadata={"help": (
        "Folder for results.json, results.md, runs/ (one JSON per finished run) and adapters.")})
    resume: bool = field(default=True, metadata={"help": (
        "Skip runs whose result file already exists in output_dir/runs (an interrupted protocol resumes).")})
    resume_from_checkpoint: bool = field(default=False, metadata={"help": (
        "Continue an interrupted run from its latest Trainer checkpoint.")})
    save_strategy: str = field(default="no", metadata={"help": "Trainer checkpoints within a run: no, epoch or steps."})
    save_adapters: bool = field(default=True, metadata={"help": (
        "Save the first run's adapter (and head) per method; full fine-tuning saves only its size.")})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Worker processes decoding images."})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 autocast."})
    fp16: bool = field(default=False, metadata={"help": "float16 autocast."})
    logging_steps: int = field(default=10, metadata={"help": "Log the training loss every this many steps."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars."})
    report_to: str = field(default="none", metadata={"help": REPORT_TO_HELP})
    paper_table: str | None = field(default=None, metadata={"help": (
        "Which table of the NOLA paper this config reproduces (recorded in results.json).")})


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------


def _set_head_labels(config, classes: Sequence[str]) -> None:
    config.num_labels = len(classes)
    config.id2label = {i: c for i, c in enumerate(classes)}
    config.label2id = {c: i for i, c in enumerate(classes)}


def _model_location(cfg: VisionConfig) -> str:
    from peft_nola.model_card import looks_like_local_path

    name = cfg.model_name_or_path
    path = resolve_path(name)
    if path.exists():
        return str(path)
    if looks_like_local_path(name):
        raise RecipeError(f"model path not found: {name} (pass --model_name_or_path with an existing directory or "
                          "a hub name such as google/vit-base-patch16-224-in21k)")
    return name


def _mae_to_vit(location: str, classes: Sequence[str]):
    """A ViTForImageClassification carrying an MAE encoder's weights (ViTMAEModel / ViTMAEForPreTraining).

    Both use the same block layout; only the prefix differs and MAE's decoder is dropped. MAE masks no patches at
    fine-tuning time, which is what a plain ViT forward does.
    """
    import torch
    from transformers import AutoConfig, ViTConfig, ViTForImageClassification, ViTMAEModel

    mae_config = AutoConfig.from_pretrained(location)
    shared = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
              "layer_norm_eps", "image_size", "patch_size", "num_channels", "qkv_bias", "initializer_range")
    vit_config = ViTConfig(**{k: getattr(mae_config, k) for k in shared if hasattr(mae_config, k)})
    _set_head_labels(vit_config, classes)
    encoder = ViTMAEModel.from_pretrained(location)
    model = ViTForImageClassification(vit_config)
    state = {f"vit.{k}": v for k, v in encoder.state_dict().items()}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("classifier.")]
    if missing:
        raise RecipeError(f"MAE checkpoint {location} lacks ViT weights {missing[:5]}: is it a ViT-MAE encoder?")
    with torch.no_grad():  # MAE's position table is a fixed sin-cos buffer-like parameter; keep it frozen-equal.
        model.vit.embeddings.position_embeddings.copy_(encoder.embeddings.position_embeddings)
    return model


def load_base_model(cfg: VisionConfig, classes: Sequence[str]):
    """The backbone with a classification head sized to ``classes``.

    Raises :class:`RecipeError` when ``num_labels`` / ``model_config`` / a kept pretrained head disagree with the
    dataset's class count.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageClassification

    n = len(classes)
    if cfg.num_labels is not None and cfg.num_labels != n:
        raise RecipeError(f"num_labels is {cfg.num_labels} but the dataset has {n} classes "
                          f"({', '.join(list(classes)[:5])}, ...); remove num_labels or fix exclude_classes")
    if cfg.model_config is not None:
        example = "{model_type: vit, hidden_size: 32, ...}"
        model_type, kwargs, backbone_seed = split_model_config(cfg.model_config, example)
        if "num_labels" in kwargs and kwargs["num_labels"] != n:
            raise RecipeError(f"model_config has num_labels {kwargs['num_labels']} but the dataset has {n} classes")
        kwargs.pop("num_labels", None)
        config = AutoConfig.for_model(model_type, **kwargs)
        _set_head_labels(config, classes)
        torch.manual_seed(backbone_seed)
        return AutoModelForImageClassification.from_config(config)
    location = _model_location(cfg)
    try:
        config = AutoConfig.from_pretrained(location)
    except OSError as exc:
        raise RecipeError(f"cannot load model '{cfg.model_name_or_path}': {exc}. Without internet, pass a local "
                          "directory with --model_name_or_path.") from None
    if config.model_type == "vit_mae":
        return _mae_to_vit(location, classes)
    if cfg.keep_pretrained_head:
        if config.num_labels != n:
            raise RecipeError(f"the checkpoint's head has {config.num_labels} classes but the dataset has {n}; set "
                              "keep_pretrained_head: false to train a new head")
        return AutoModelForImageClassification.from_pretrained(location)
    return AutoModelForImageClassification.from_pretrained(
        location, num_labels=n, id2label={i: c for i, c in enumerate(classes)},
        label2id={c: i for i, c in enumerate(classes)}, ignore_mismatched_sizes=True,
    )


def normalisation(cfg: VisionConfig) -> tuple[list[float], list[float]]:
    """(mean, std): the config's, else the checkpoint's image processor's, else ImageNet's."""
    if cfg.image_mean is not None and cfg.image_std is not None:
        return list(cfg.image_mean), list(cfg.image_std)
    if cfg.model_config is None:
        try:
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(_model_location(cfg))
            return list(processor.image_mean), list(processor.image_std)
        except Exception:  # no preprocessor_config.json (or an offline hub name): the paper's statistics
            pass
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


def head_of(model, head_module: str):
    """The classification head module (``classifier`` for ViT)."""
    head = getattr(model, head_module, None)
    if head is None:
        raise RecipeError(f"{type(model).__name__} has no '{head_module}' module: set head_module in the config")
    return head


def resolve_targets(model, roles: Sequence[str]) -> list[str]:
    """peft target-module suffixes for roles (q/k/v/fc1/fc2) in this model's naming."""
    names = [n for n, _ in model.named_modules()]
    targets = []
    for role in roles:
        for candidate in TARGET_NAMES[role]:
            if any(names_module(candidate, n) for n in names):
                targets.append(candidate)
                break
        else:
            raise RecipeError(f"{type(model).__name__} has no '{role}' projection ({' / '.join(TARGET_NAMES[role])})")
    return targets


def nola_rank(cfg: VisionConfig, model) -> int:
    """The paper's NOLA rank: 4 on ViT-B, 1 on ViT-L, unless the config sets one."""
    if cfg.nola_r is not None:
        return cfg.nola_r
    return 4 if model.config.hidden_size <= 768 else 1


def trainable_parameters(model, head_module: str) -> tuple[int, int]:
    """(trainable parameters outside the head, trainable head parameters)."""
    body = head = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        in_head = any(part == head_module for part in name.split("."))
        head += p.numel() if in_head else 0
        body += 0 if in_head else p.numel()
    return body, head


def prepare_model(cfg: VisionConfig, base_model, method: str, seed: int):
    """A fresh copy of ``base_model`` set up for ``method``: new head drawn with ``seed``, the method's parameters
    trainable, the head trainable in every method."""
    import torch

    preset = METHOD_PRESETS[method]
    model = copy.deepcopy(base_model)
    torch.manual_seed(seed)
    if not cfg.keep_pretrained_head:
        head_of(model, cfg.head_module).reset_parameters()
    kind = preset["kind"]
    if kind == "full":
        model.requires_grad_(True)
        return model
    model.requires_grad_(False)
    if kind == "linear":
        head_of(model, cfg.head_module).requires_grad_(True)
        return model
    r = preset["r"] if preset.get("r") is not None else nola_rank(cfg, model)
    args = AdapterArgs(
        method=kind, target_modules=resolve_targets(model, preset["targets"]), r=r,
        num_basis_A=cfg.num_basis_A, num_basis_B=cfg.num_basis_B, nola_alpha=cfg.nola_alpha,
        basis_seed=cfg.basis_seed, basis_mode=cfg.basis_mode,
        lora_alpha=float(cfg.lora_alpha if cfg.lora_alpha is not None else r), adapter_dropout=cfg.adapter_dropout,
        fan_in_fan_out=False,
    )
    peft_config = build_peft_config(args, model, task_type=None)
    peft_config.modules_to_save = [cfg.head_module]
    from peft import get_peft_model

    return get_peft_model(model, peft_config)


# --------------------------------------------------------------------------------------------------------------------
# Training, evaluation, 1-NN
# --------------------------------------------------------------------------------------------------------------------


def _training_arguments(cfg: VisionConfig, run_dir: Path, lr: float, seed: int):
    return training_arguments(
        run_dir, num_train_epochs=cfg.epochs, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size, learning_rate=lr, weight_decay=cfg.weight_decay,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": cfg.min_lr},
        warmup_steps=cfg.warmup_steps, label_smoothing_factor=cfg.label_smoothing, optim="adamw_torch",
        seed=seed, data_seed=seed, save_strategy=cfg.save_strategy, logging_steps=cfg.logging_steps,
        label_names=["labels"], bf16=cfg.bf16, fp16=cfg.fp16, dataloader_num_workers=cfg.dataloader_num_workers,
        disable_tqdm=cfg.disable_tqdm, dataloader_drop_last=False, report_to=cfg.report_to,
    )


def predict_top1(trainer, dataset: TransformedImages) -> float:
    """Top-1 accuracy (percent) of the trainer's model on ``dataset``."""
    output = trainer.predict(dataset)
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    labels = np.asarray(dataset.images.labels)
    return round(float((np.asarray(logits).argmax(-1) == labels).mean() * 100.0), 6)


def train_and_score(cfg: VisionConfig, base_model, method: str, train_set: TransformedImages,
                    eval_set: TransformedImages, lr: float, seed: int, run_dir: Path):
    """Train one run and return (top-1 on eval_set at the final epoch, trained model)."""
    from transformers import Trainer, set_seed

    set_seed(seed)
    model = prepare_model(cfg, base_model, method, seed)
    trainer = Trainer(model=model, args=_training_arguments(cfg, run_dir, lr, seed), train_dataset=train_set,
                      data_collator=collate_images)
    # run_dir is <output_dir>/runs/<k>shot/<method>/<split>_lr<lr>_set<s>_init<i>
    use_console(trainer, f"training {METHOD_PRESETS[method]['label']} ({run_dir.parent.parent.name}, {run_dir.name})")
    latest = latest_complete_checkpoint(run_dir) if cfg.resume_from_checkpoint else None
    trainer.train(resume_from_checkpoint=str(latest) if latest else None)
    return predict_top1(trainer, eval_set), model


def classifier_features(model, images: TransformedImages, head_module: str, batch_size: int):
    """L2-normalised inputs of the classification head (CLS token after the final norm for ViT)."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    captured = []
    hook = head_of(model, head_module).register_forward_hook(lambda m, inp, out: captured.append(inp[0].detach()))
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                batch = collate_images([images[i] for i in range(start, min(start + batch_size, len(images)))])
                model(pixel_values=batch["pixel_values"].to(device))
    finally:
        hook.remove()
    features = torch.cat(captured).float()
    return torch.nn.functional.normalize(features, dim=-1).cpu()


def nearest_neighbour_top1(train_features, train_labels, test_features, test_labels) -> float:
    """Top-1 (percent) of 1-nearest-neighbour by cosine similarity (features already L2-normalised)."""
    nearest = (test_features @ train_features.T).argmax(dim=1).numpy()
    predicted = np.asarray(train_labels)[nearest]
    return round(float((predicted == np.asarray(test_labels)).mean() * 100.0), 6)


# --------------------------------------------------------------------------------------------------------------------
# Protocol
# --------------------------------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (numpy's default, as the paper's calculate_acc_mean_std.py)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std())


# Keys that cannot change a run's outcome; every other config key is part of a run's fingerprint.
_NOT_IN_FINGERPRINT = {"output_dir", "resume", "resume_from_checkpoint", "save_strategy", "save_adapters", "methods",
                       "shots", "dataloader_num_workers", "logging_steps", "disable_tqdm", "report_to", "paper_table",
                       "model_label",
                       "dataset", "lr_grid", "lr_grid_full", "lr_search_runs", "sample_sets", "inits",
                       "eval_batch_size"}


def run_fingerprint(cfg: VisionConfig) -> str:
    """Hash of the settings that determine a run's result, so resuming never reuses a run made under another
    config (the run's own method, shots, learning rate, sample set and seed are in its file name)."""
    import hashlib

    relevant = {k: v for k, v in config_to_dict(cfg).items() if k not in _NOT_IN_FINGERPRINT}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _read_run(path: Path, fingerprint: str) -> dict | None:
    """A finished run's record when it was made under the same settings."""
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("fingerprint") == fingerprint else None


def _lr_tag(lr: float) -> str:
    return f"{lr:g}"


def _first_per_class(images: LabeledImages, per_class: int | None) -> list[int]:
    if per_class is None:
        return list(range(len(images)))
    seen: dict[int, int] = {}
    keep = []
    for i, label in enumerate(images.labels):
        if seen.get(label, 0) < per_class:
            keep.append(i)
            seen[label] = seen.get(label, 0) + 1
    return keep


class Protocol:
    """Holds the data, base model and transforms of one recipe run and executes its runs."""

    def __init__(self, cfg: VisionConfig, train: LabeledImages, test: LabeledImages, base_model):
        self.cfg = cfg
        self.train = train
        self.test = test.subset(_first_per_class(test, cfg.max_test_per_class))
        self.base_model = base_model
        self.out = Path(cfg.output_dir)
        image_size = base_model.config.image_size
        mean, std = normalisation(cfg)
        self.train_transform = ImageTransform(image_size, mean, std, augment=cfg.augment)
        self.eval_transform = ImageTransform(image_size, mean, std, augment="none")
        self.val_indices = holdout_indices(train.labels, cfg.val_per_class, cfg.validation_seed)
        self.val_set = TransformedImages(train.subset(self.val_indices), self.eval_transform)
        self.test_set = TransformedImages(self.test, self.eval_transform)
        self._knn_cache: dict | None = None

    def kshot(self, shots: int, sample_set: int) -> list[int]:
        """Train-split indices of k-shot set ``sample_set``."""
        return kshot_indices(self.train.labels, shots, self.cfg.sampling_seed + sample_set, exclude=self.val_indices,
                             class_names=self.train.classes)

    def _train_set(self, shots: int, sample_set: int) -> TransformedImages:
        return TransformedImages(self.train.subset(self.kshot(shots, sample_set)), self.train_transform, preload=True)

    def run(self, method: str, shots: int, sample_set: int, init: int, lr: float, split: str) -> dict:
        """One training run scored on ``split`` (val | test); cached in output_dir/runs."""
        cfg = self.cfg
        name = f"{split}_lr{_lr_tag(lr)}_set{sample_set}_init{init}"
        run_dir = self.out / "runs" / f"{shots}shot" / method / name
        record_path = run_dir.with_suffix(".json")
        fingerprint = run_fingerprint(cfg)
        if cfg.resume and (record := _read_run(record_path, fingerprint)) is not None:
            return record
        started = time.time()
        eval_set = self.val_set if split == "val" else self.test_set
        top1, model = train_and_score(cfg, self.base_model, method, self._train_set(shots, sample_set), eval_set, lr,
                                      cfg.init_seed + init, run_dir)
        body, head = trainable_parameters(model, cfg.head_module)
        record = dict(fingerprint=fingerprint, method=method, shots=shots, sample_set=sample_set, init=init,
                      seed=cfg.init_seed + init,
                      learning_rate=lr, split=split, top1=top1, trainable_params=body, head_params=head,
                      wall_time_s=time.time() - started)
        if split == "test" and sample_set == 0 and init == 0:
            record["adapter_bytes"] = self._save(model, method, shots)
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record, indent=2) + "\n")
        return record

    def _save(self, model, method: str, shots: int) -> int:
        """Save the first run's trained weights (adapter + head; head only for linear); full FT reports its size."""
        kind = METHOD_PRESETS[method]["kind"]
        if kind == "full" or not self.cfg.save_adapters:
            trainable = [p for p in model.parameters() if p.requires_grad]
            return int(sum(p.numel() * p.element_size() for p in trainable))
        target = self.out / "adapters" / f"{shots}shot" / method
        if kind == "linear":
            from safetensors.torch import save_file

            target.mkdir(parents=True, exist_ok=True)
            head = head_of(model, self.cfg.head_module)
            save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(target / "head.safetensors"))
            return (target / "head.safetensors").stat().st_size
        return save_adapter(model, target)

    def choose_lr(self, method: str, shots: int) -> tuple[float, dict[str, float]]:
        """The grid's learning rate with the best mean validation top-1 (first on ties)."""
        cfg = self.cfg
        grid = cfg.lr_grid_full if METHOD_PRESETS[method]["kind"] == "full" else cfg.lr_grid
        if len(grid) == 1:
            return grid[0], {}
        if not self.val_indices:
            raise RecipeError(f"choosing among {len(grid)} learning rates needs a validation hold-out: set "
                              "val_per_class > 0 (or give a one-value grid)")
        scores = {}
        pairs = [(s, i) for s in range(cfg.sample_sets) for i in range(cfg.inits)][: max(1, cfg.lr_search_runs)]
        for lr in grid:
            scores[_lr_tag(lr)] = float(np.mean([self.run(method, shots, s, i, lr, "val")["top1"] for s, i in pairs]))
        best = max(grid, key=lambda lr: scores[_lr_tag(lr)])
        return best, scores

    def knn(self, shots: int) -> list[dict]:
        """1-NN top-1 per sample set (frozen features, computed once for the train pool and the test split)."""
        cfg = self.cfg
        if self._knn_cache is None:
            needed = sorted({i for k in cfg.shots for s in range(cfg.sample_sets) for i in self.kshot(k, s)})
            subset = TransformedImages(self.train.subset(needed), self.eval_transform, preload=True)
            self._knn_cache = dict(
                index={j: row for row, j in enumerate(needed)},
                train=classifier_features(self.base_model, subset, cfg.head_module, cfg.eval_batch_size),
                test=classifier_features(self.base_model, self.test_set, cfg.head_module, cfg.eval_batch_size),
            )
        cache = self._knn_cache
        records = []
        for s in range(cfg.sample_sets):
            chosen = self.kshot(shots, s)
            rows = [cache["index"][j] for j in chosen]
            top1 = nearest_neighbour_top1(cache["train"][rows], [self.train.labels[j] for j in chosen], cache["test"],
                                          self.test.labels)
            records.append(dict(method="knn", shots=shots, sample_set=s, init=None, learning_rate=None, split="test",
                                top1=top1, trainable_params=0, head_params=0, adapter_bytes=0))
        return records

    def cell(self, method: str, shots: int) -> dict:
        """All runs of one (method, shots) cell and their aggregate."""
        if METHOD_PRESETS[method]["kind"] == "knn":
            runs, lr, search = self.knn(shots), None, {}
        else:
            lr, search = self.choose_lr(method, shots)
            runs = [self.run(method, shots, s, i, lr, "test") for s in range(self.cfg.sample_sets)
                    for i in range(self.cfg.inits)]
        mean, std = mean_std([r["top1"] for r in runs])
        return dict(top1_mean=mean, top1_std=std, learning_rate=lr, lr_search_val_top1=search,
                    trainable_params=runs[0]["trainable_params"], head_params=runs[0]["head_params"],
                    adapter_bytes=runs[0].get("adapter_bytes", 0), runs=runs)


def model_label(cfg: VisionConfig, model) -> str:
    """"ViT-B" / "ViT-L" (by width) unless the config names the model."""
    if cfg.model_label:
        return cfg.model_label
    hidden = model.config.hidden_size
    return {768: "ViT-B", 1024: "ViT-L", 1280: "ViT-H"}.get(hidden, f"ViT (d={hidden})")


def table6_markdown(model_name: str, dataset: str, per_method: dict, shots: Sequence[int]) -> str:
    """Rows per method, columns per shot count: ``mean ± std`` top-1, as the paper's Table 6."""
    rows = []
    for method, entry in per_method.items():
        row = {"model": model_name, "method": entry["label"], "params": f"{entry['trainable_params']:,}"}
        for k in shots:
            cell = entry["shots"].get(str(k))
            row[str(k)] = f"{cell['top1_mean']:.1f} ± {cell['top1_std']:.1f}" if cell else None
        rows.append(row)
    headers = ["Model", "Method", "# Train Params"] + [f"{dataset} {k}-shot" for k in shots]
    return markdown_table(rows, ["model", "method", "params"] + [str(k) for k in shots], headers)


def validate(cfg: VisionConfig) -> None:
    """Config errors caught before any data or model is loaded."""
    unknown = [m for m in cfg.methods if m not in METHOD_PRESETS]
    if unknown:
        raise RecipeError(f"unknown method(s) {unknown}: choose from {', '.join(METHOD_PRESETS)}")
    if not cfg.methods:
        raise RecipeError("methods is empty: list at least one of " + ", ".join(METHOD_PRESETS))
    if not cfg.shots or min(cfg.shots) < 1:
        raise RecipeError(f"shots must be positive integers, got {cfg.shots}")
    if cfg.sample_sets < 1 or cfg.inits < 1:
        raise RecipeError("sample_sets and inits must be >= 1")
    if cfg.augment not in ("paper", "flip", "none"):
        raise RecipeError(f"augment must be paper, flip or none, got '{cfg.augment}'")
    if any(METHOD_PRESETS[m]["kind"] == "full" for m in cfg.methods) and not cfg.lr_grid_full:
        raise RecipeError("lr_grid_full is empty")
    if any(METHOD_PRESETS[m]["kind"] not in ("full", "knn") for m in cfg.methods) and not cfg.lr_grid:
        raise RecipeError("lr_grid is empty")
    report_targets(cfg.report_to)


def load_data(cfg: VisionConfig) -> tuple[LabeledImages, LabeledImages]:
    """(train, test) images per the config: local files under data_dir (found by the data rule: as given, else under
    $PEFT_NOLA_DATA_DIR or ../shared/data), or a hub dataset."""
    hint = "pass --data_dir none --hub_dataset NAME to read a Hugging Face datasets image dataset (needs internet)"
    data_dir = resolve_data_path(cfg.data_dir, "data_dir", hub_hint=hint) if cfg.data_dir else None

    def in_data_dir(name):
        return None if name is None else str(locate(name, data_dir))

    return load_splits(data_dir, cfg.hub_dataset, cfg.hub_config, cfg.train_split, cfg.test_split,
                       cfg.image_column, cfg.label_column, cfg.exclude_classes,
                       in_data_dir(cfg.train_list), in_data_dir(cfg.test_list))


def run_methods(cfg: VisionConfig, protocol: Protocol) -> dict[str, dict]:
    """Every method's cells (one per shot count: mean, std and runs), printed as they finish."""
    gc_was_frozen = gc.get_freeze_count()
    # Trainer runs gc.collect() after every run; without freezing the long-lived objects (library modules,
    # the image index) each collection walks all of them, which dominates short few-shot runs.
    import peft  # noqa: F401  (imported before the freeze so its objects are frozen too)
    from transformers import Trainer  # noqa: F401

    gc.collect()
    gc.freeze()
    try:
        per_method: dict[str, dict] = {}
        for method in cfg.methods:
            entry = per_method.setdefault(method, dict(label=METHOD_PRESETS[method]["label"],
                                                       peft_method=METHOD_PRESETS[method]["kind"], shots={}))
            for k in cfg.shots:
                cell = protocol.cell(method, k)
                entry["shots"][str(k)] = cell
                entry["trainable_params"] = cell["trainable_params"]
                entry["adapter_bytes"] = cell["adapter_bytes"]
                print(f"[vision] {method} {k}-shot: top1 {cell['top1_mean']:.2f} ± {cell['top1_std']:.2f} "
                      f"over {len(cell['runs'])} runs (lr {cell['learning_rate']})", flush=True)
        return per_method
    finally:
        if not gc_was_frozen:
            gc.unfreeze()


def summarise(cfg: VisionConfig, per_method: dict[str, dict], name: str, classes: int, test_images: int,
              started: float) -> tuple[dict, str]:
    """``(results, markdown)``: the first method's first cell as the headline metric, every cell by name, Table 6."""
    first = per_method[cfg.methods[0]]
    first_cell = first["shots"][str(cfg.shots[0])]
    metrics = {"top1": first_cell["top1_mean"], "top1_std": first_cell["top1_std"]}
    for method, entry in per_method.items():
        for k, cell in entry["shots"].items():
            metrics[f"top1/{method}/{k}shot"] = cell["top1_mean"]
    markdown = (f"# Few-shot top-1 (%) on {cfg.dataset}: mean ± std over {cfg.sample_sets} sample sets x "
                f"{cfg.inits} inits (1-NN: sample sets only)\n\n" + table6_markdown(name, cfg.dataset, per_method, cfg.shots))
    results = {
        "recipe": "vision",
        "config": config_to_dict(cfg),
        "method": first["peft_method"] if len(per_method) == 1 else "+".join(cfg.methods),
        "trainable_params": first["trainable_params"],
        "adapter_bytes": first["adapter_bytes"],
        "metrics": metrics,
        "base_metrics": {},  # a new random head makes the un-adapted model's accuracy meaningless; 1-NN is the frozen baseline
        "wall_time_s": time.time() - started,
        "peak_memory_bytes": peak_memory_bytes(),
        "model": name,
        "dataset": cfg.dataset,
        "classes": classes,
        "test_images": test_images,
        "top1_unit": "percent",
        "per_method": per_method,
    }
    return results, markdown


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the protocol for every method and shot count; returns the results dict (also in ``results.json``)."""
    cfg = load_config(VisionConfig, argv)
    validate(cfg)
    if cfg.model_config is None:
        _model_location(cfg)  # a missing local model path fails before the data is read
    started = time.time()
    try:
        train, test = load_data(cfg)
        base_model = load_base_model(cfg, train.classes)
        protocol = Protocol(cfg, train, test, base_model)
        # Draw every k-shot set up front: a class with too few images fails before any training.
        for k in cfg.shots:
            for s in range(cfg.sample_sets):
                protocol.kshot(k, s)
        per_method = run_methods(cfg, protocol)
    except DataError as exc:
        raise RecipeError(str(exc)) from None
    results, markdown = summarise(cfg, per_method, model_label(cfg, base_model), len(train.classes),
                                  len(protocol.test), started)
    path = write_results(cfg.output_dir, results, markdown)
    print(markdown)
    print(f"[vision] wrote {path}")
    return results


if __name__ == "__main__":
    run_cli(main)
