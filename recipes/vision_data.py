"""Image classification data for the few-shot vision recipe: readers, the k-shot sampler and plain PIL/numpy
transforms (no torchvision or timm: their wheels pull a multi-GB CUDA torch).

Sources (see :func:`load_splits`):

* an ImageFolder-style directory ``DATA_DIR/<split>/<class>/<image>`` (``train`` and ``test``, or ``val``),
* tar files of such trees read in place (``cifar10_*.tar`` holding ``train/<class>/...`` and ``test/<class>/...``),
  optionally split by list files (Caltech-101: one tar of ``<class>/<image>`` plus ``train.txt`` / ``test.txt``),
* a Hugging Face ``datasets`` image dataset by hub name, ``save_to_disk`` folder or parquet/arrow folder.

Every reader yields a :class:`LabeledImages`: class names, an integer label per image, a unique name per image (used
to prove that training and evaluation images never overlap) and a ``read(i)`` that decodes image ``i`` to RGB.
"""

from __future__ import annotations

import io
import math
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TEST_SPLIT_NAMES = ("test", "val", "validation")
IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label", "coarse_label")

# ImageNet statistics: what the paper's pipeline normalises with (and the supervised/MAE ViT checkpoints expect).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """Unusable image data; the message names the file/class and what to change."""


# --------------------------------------------------------------------------------------------------------------------
# Labeled image collections
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class LabeledImages:
    """A split: ``labels[i]`` indexes ``classes``; ``names[i]`` is unique within the dataset (e.g. ``test/cat/1.jpg``);
    ``reader(i)`` returns image ``i`` as a PIL image or encoded bytes."""

    classes: list[str]
    labels: list[int]
    names: list[str]
    reader: Callable[[int], object]

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int):
        """Image ``i`` as an RGB PIL image; :class:`DataError` naming the image when it cannot be decoded."""
        from PIL import Image, UnidentifiedImageError

        try:
            raw = self.reader(i)
            image = raw if isinstance(raw, Image.Image) else Image.open(io.BytesIO(raw))
            image.load()
            return image.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            raise DataError(f"cannot read image '{self.names[i]}': {exc}. Remove or replace the file.") from None

    def subset(self, indices: Sequence[int]) -> "LabeledImages":
        """The images at ``indices`` (same class list)."""
        indices = list(indices)
        parent = self.reader
        return LabeledImages(self.classes, [self.labels[i] for i in indices], [self.names[i] for i in indices],
                             lambda j: parent(indices[j]))

    def class_counts(self) -> list[int]:
        """Number of images per class, in class order."""
        return np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=len(self.classes)).tolist()


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _build(entries: list[tuple[str, str, Callable[[], object]]], classes: Sequence[str] | None,
           exclude: Sequence[str]) -> LabeledImages:
    """(class name, unique name, loader) triples -> LabeledImages, sorted by name for a stable order."""
    entries = sorted((e for e in entries if e[0] not in set(exclude)), key=lambda e: e[1])
    if classes is None:
        classes = sorted({c for c, _, _ in entries})
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({c for c, _, _ in entries if c not in index})
    if unknown:
        raise DataError(f"test images belong to classes absent from the training split: {unknown[:5]}")
    loaders = [load for _, _, load in entries]
    return LabeledImages(list(classes), [index[c] for c, _, _ in entries], [n for _, n, _ in entries],
                         lambda i: loaders[i]())


def _read_file(path: Path) -> Callable[[], bytes]:
    return lambda: path.read_bytes()


def read_image_folder(root: Path, classes: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> LabeledImages:
    """``root/<class>/<image>`` (nested folders below a class are included)."""
    entries = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(class_dir.rglob("*")):
            if path.is_file() and _is_image(path.name):
                entries.append((class_dir.name, f"{root.name}/{path.relative_to(root).as_posix()}", _read_file(path)))
    if not entries:
        raise DataError(f"no images found under {root} (expected {root}/<class>/<image>.jpg)")
    return _build(entries, classes, exclude)


def _tar_reader(tar_path: Path, offset: int, size: int) -> Callable[[], bytes]:
    """Read one member's bytes by offset: no open TarFile is shared across DataLoader worker processes."""

    def read() -> bytes:
        with open(tar_path, "rb") as handle:
            handle.seek(offset)
            return handle.read(size)

    return read


def index_tars(tar_paths: Sequence[Path]) -> list[tuple[Path, str, Callable[[], bytes]]]:
    """Every image member of the (uncompressed or compressed) tar files: (tar, member path, reader)."""
    members = []
    for tar_path in tar_paths:
        try:
            with tarfile.open(tar_path) as tar:
                seekable = tar_path.suffix == ".tar"
                for info in tar:
                    if not (info.isfile() and _is_image(info.name)):
                        continue
                    if seekable:
                        reader = _tar_reader(tar_path, info.offset_data, info.size)
                    else:  # compressed archives cannot be seeked into: keep the bytes (small datasets only)
                        data = tar.extractfile(info).read()
                        reader = lambda data=data: data  # noqa: E731
                    members.append((tar_path, info.name.lstrip("./"), reader))
        except tarfile.TarError as exc:
            raise DataError(f"cannot read tar file {tar_path}: {exc}") from None
    return members


def _read_split_list(path: Path) -> set[str]:
    """Split list lines are ``<class>/<image>`` paths (Caltech-101 train.txt / test.txt)."""
    return {line.strip().lstrip("./") for line in path.read_text().splitlines() if line.strip()}


def read_tar_splits(data_dir: Path, train_split: str, test_split: str, exclude: Sequence[str] = (),
                    train_list: Path | None = None, test_list: Path | None = None) -> tuple[LabeledImages, LabeledImages]:
    """Train/test splits from the tar files in ``data_dir``.

    A member ``.../<split>/<class>/<image>`` belongs to that split; with split lists, a member belongs to the split
    whose list holds its ``<class>/<image>`` suffix, and members in neither list are ignored.
    """
    members = index_tars(sorted(data_dir.glob("*.tar*")))
    if train_list is None and (data_dir / f"{train_split}.txt").is_file():
        train_list, test_list = data_dir / f"{train_split}.txt", data_dir / f"{test_split}.txt"
    lists = None
    if train_list is not None:
        missing = [str(p) for p in (train_list, test_list) if p is None or not Path(p).is_file()]
        if missing:
            raise DataError(f"split list file(s) not found: {missing}")
        lists = {"train": _read_split_list(Path(train_list)), "test": _read_split_list(Path(test_list))}
    split_entries: dict[str, list] = {"train": [], "test": []}
    for tar_path, name, reader in members:
        parts = name.split("/")
        if len(parts) < 2:
            continue
        suffix = "/".join(parts[-2:])
        if lists is not None:
            for split in ("train", "test"):
                if suffix in lists[split]:
                    split_entries[split].append((parts[-2], f"{split}/{suffix}", reader))
        else:
            for split, split_name in (("train", train_split), ("test", test_split)):
                if split_name in parts[:-2]:
                    split_entries[split].append((parts[-2], name, reader))
    for split, split_name in (("train", train_split), ("test", test_split)):
        if not split_entries[split]:
            raise DataError(
                f"no '{split_name}' images in the tar files of {data_dir}: members must look like "
                f"{split_name}/<class>/<image>.jpg, or provide {train_split}.txt / {test_split}.txt split lists"
            )
    train = _build(split_entries["train"], None, exclude)
    return train, _build(split_entries["test"], train.classes, exclude)


def _column(features, wanted: str | None, candidates: Sequence[str], what: str) -> str:
    if wanted:
        if wanted not in features:
            raise DataError(f"{what} column '{wanted}' not in the dataset (columns: {list(features)})")
        return wanted
    for name in candidates:
        if name in features:
            return name
    raise DataError(f"no {what} column among {list(features)}: set {what}_column in the config")


def hub_images(split_data, image_column: str | None, label_column: str | None, split_name: str,
               exclude: Sequence[str] = (), classes: Sequence[str] | None = None) -> LabeledImages:
    """A ``datasets.Dataset`` split (ClassLabel or integer labels) as LabeledImages; images decode lazily."""
    image_col = _column(split_data.features, image_column, IMAGE_COLUMNS, "image")
    label_col = _column(split_data.features, label_column, LABEL_COLUMNS, "label")
    feature = split_data.features[label_col]
    labels = list(split_data[label_col])
    names = list(getattr(feature, "names", None) or [str(i) for i in range(max(labels) + 1)])
    keep = [i for i, lab in enumerate(labels) if names[lab] not in set(exclude)]
    if classes is None:
        classes = [n for n in names if n not in set(exclude)]
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({names[labels[i]] for i in keep if names[labels[i]] not in index})
    if unknown:
        raise DataError(f"split '{split_name}' has classes absent from the training split: {unknown[:5]}")
    columns_only = split_data.select_columns([image_col])

    def read(j: int):
        value = columns_only[keep[j]][image_col]
        if isinstance(value, dict):  # undecoded Image feature
            return value.get("bytes") or Path(value["path"]).read_bytes()
        return value

    return LabeledImages(list(classes), [index[names[labels[i]]] for i in keep],
                         [f"{split_name}/{i}" for i in keep], read)


def load_hub_splits(source: str, config_name: str | None, train_split: str, test_split: str,
                    image_column: str | None, label_column: str | None,
                    exclude: Sequence[str] = ()) -> tuple[LabeledImages, LabeledImages]:
    """Train/test splits of a hub dataset (name), a ``save_to_disk`` folder or a folder of parquet/arrow files."""
    import datasets

    path = Path(source)
    try:
        if (path / "dataset_dict.json").is_file():
            data = datasets.load_from_disk(str(path))
        else:
            data = datasets.load_dataset(source, config_name)
    except Exception as exc:  # datasets raises many types (FileNotFoundError, ConnectionError, DatasetNotFoundError)
        raise DataError(f"cannot load dataset '{source}': {exc}. Without internet, pass a local folder.") from None
    for split in (train_split, test_split):
        if split not in data:
            raise DataError(f"dataset '{source}' has no split '{split}' (splits: {list(data)}); set train_split / "
                            "test_split")
    train = hub_images(data[train_split], image_column, label_column, train_split, exclude)
    return train, hub_images(data[test_split], image_column, label_column, test_split, exclude, train.classes)


def load_splits(data_dir: str | os.PathLike | None = None, hub_dataset: str | None = None,
                hub_config: str | None = None, train_split: str = "train", test_split: str | None = None,
                image_column: str | None = None, label_column: str | None = None,
                exclude_classes: Sequence[str] = (), train_list: str | None = None,
                test_list: str | None = None) -> tuple[LabeledImages, LabeledImages]:
    """(train, test) splits from ``data_dir`` when given (so ``--data_dir`` overrides a config's hub name), else from
    ``hub_dataset`` (see the module docstring for the layouts)."""
    if data_dir is None:
        if hub_dataset:
            return load_hub_splits(hub_dataset, hub_config, train_split, test_split or "test", image_column,
                                   label_column, exclude_classes)
        raise DataError("set data_dir (an image folder / tar folder / saved dataset) or hub_dataset")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data_dir not found: {root} (pass --data_dir with an existing folder)")
    if (root / "dataset_dict.json").is_file() or any(root.glob("*.parquet")) or any(root.glob("*/*.parquet")):
        return load_hub_splits(str(root), hub_config, train_split, test_split or "test", image_column,
                               label_column, exclude_classes)
    test_names = [test_split] if test_split else list(TEST_SPLIT_NAMES)
    if (root / train_split).is_dir():
        test_dir = next((root / n for n in test_names if (root / n).is_dir()), None)
        if test_dir is None:
            raise DataError(f"{root} has {train_split}/ but no {' or '.join(test_names)}/ folder for evaluation")
        train = read_image_folder(root / train_split, exclude=exclude_classes)
        return train, read_image_folder(test_dir, train.classes, exclude_classes)
    if any(root.glob("*.tar*")):
        return read_tar_splits(root, train_split, test_split or "test", exclude_classes,
                               Path(train_list) if train_list else None, Path(test_list) if test_list else None)
    raise DataError(
        f"cannot tell the layout of {root}: expected {train_split}/<class>/<image> and test/<class>/<image> folders, "
        "tar files of such trees, a datasets save_to_disk folder or parquet files"
    )


# --------------------------------------------------------------------------------------------------------------------
# k-shot sampling
# --------------------------------------------------------------------------------------------------------------------


def holdout_indices(labels: Sequence[int], per_class: int, seed: int) -> list[int]:
    """``per_class`` images of every class, drawn with ``seed``, kept out of every k-shot set (the validation split
    the learning rate is chosen on)."""
    if per_class <= 0:
        return []
    return kshot_indices(labels, per_class, seed, pool_name="the validation hold-out")


def kshot_indices(labels: Sequence[int], shots: int, seed: int, exclude: Sequence[int] = (),
                  class_names: Sequence[str] | None = None, pool_name: str = "the training split") -> list[int]:
    """Exactly ``shots`` indices per class, drawn without replacement from the indices not in ``exclude``.

    Each class draws a seeded permutation of its pool and keeps the first ``shots``, so for one seed the 5-shot set
    is contained in the 10-shot set. Raises :class:`DataError` naming the class when a pool is too small.
    """
    labels_arr = np.asarray(labels, dtype=np.int64)
    excluded = np.zeros(len(labels_arr), dtype=bool)
    excluded[np.asarray(list(exclude), dtype=np.int64)] = True
    num_classes = int(labels_arr.max()) + 1 if len(labels_arr) else 0
    if class_names is not None:
        num_classes = len(class_names)
    chosen = []
    for c in range(num_classes):
        pool = np.flatnonzero((labels_arr == c) & ~excluded)
        if len(pool) < shots:
            name = class_names[c] if class_names is not None else str(c)
            raise DataError(
                f"class '{name}' has {len(pool)} images available in {pool_name} but {shots} are needed per class "
                f"({int(((labels_arr == c) & excluded).sum())} more are held out for validation); lower shots or "
                "val_per_class, or drop the class with exclude_classes"
            )
        rng = np.random.default_rng([seed, c])
        chosen.extend(int(i) for i in rng.permutation(pool)[:shots])
    return chosen


# --------------------------------------------------------------------------------------------------------------------
# Transforms (PIL + numpy)
# --------------------------------------------------------------------------------------------------------------------


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale=(0.2, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a crop covering ``scale`` of the area with aspect ``ratio`` (10 tries, then
    a centred crop clamped to the ratio), the usual RandomResizedCrop sampling."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _color_jitter(image, rng: np.random.Generator, strength=(0.4, 0.4, 0.4, 0.1)):
    from PIL import ImageEnhance

    brightness, contrast, saturation, hue = strength
    ops = []
    ops.append(lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(1 - brightness, 1 + brightness)))
    ops.append(lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(1 - contrast, 1 + contrast)))
    ops.append(lambda im: ImageEnhance.Color(im).enhance(rng.uniform(1 - saturation, 1 + saturation)))

    def shift_hue(im):
        hsv = np.asarray(im.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(round(rng.uniform(-hue, hue) * 255))) % 256
        from PIL import Image

        return Image.fromarray(hsv, "HSV").convert("RGB")

    ops.append(shift_hue)
    for op_index in rng.permutation(len(ops)):
        image = ops[op_index](image)
    return image


class ImageTransform:
    """PIL image -> normalised float32 CHW array at ``image_size``.

    ``augment="paper"`` is the NOLA ViT pipeline: random resized crop (scale 0.2-1), colour jitter (p=0.8), grayscale
    (p=0.2), Gaussian blur (p=0.5), horizontal flip. ``"flip"`` is resize + flip; ``"none"`` (evaluation) resizes the
    short side to ``image_size * 256/224`` and centre-crops ``image_size``.
    """

    def __init__(self, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, augment: str = "none"):
        if augment not in ("paper", "flip", "none"):
            raise ValueError(f"augment must be paper, flip or none, got {augment!r}")
        self.image_size = image_size
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self.augment = augment

    def __call__(self, image, rng: np.random.Generator | None = None) -> np.ndarray:
        from PIL import Image, ImageFilter

        size = self.image_size
        if self.augment == "none" or rng is None:
            short = int(round(size * 256 / 224))
            w, h = image.size
            scale = short / min(w, h)
            image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
            w, h = image.size
            left, top = (w - size) // 2, (h - size) // 2
            image = image.crop((left, top, left + size, top + size))
        elif self.augment == "flip":
            image = image.resize((size, size), Image.BILINEAR)
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            box = random_resized_crop_box(*image.size, rng)
            image = image.resize((size, size), Image.BILINEAR, box=box)
            if rng.random() < 0.8:
                image = _color_jitter(image, rng)
            if rng.random() < 0.2:
                image = image.convert("L").convert("RGB")
            if rng.random() < 0.5:
                image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return (array - self.mean) / self.std


class TransformedImages:
    """A torch-style dataset of ``{"pixel_values", "labels"}`` for Trainer.

    Augmentation randomness is drawn from torch's generator (seeded by Trainer per run and per DataLoader worker),
    so runs are reproducible and workers do not repeat each other's crops.
    """

    def __init__(self, images: LabeledImages, transform: ImageTransform, preload: bool = False):
        self.images = images
        self.transform = transform
        # Decoding every k-shot image up front surfaces unreadable files before training starts.
        self.cache = [images.read(i) for i in range(len(images))] if preload else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        import torch

        image = self.cache[i] if self.cache is not None else self.images.read(i)
        rng = None
        if self.transform.augment != "none":
            rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))
        pixels = self.transform(image, rng)
        return {"pixel_values": torch.from_numpy(np.ascontiguousarray(pixels)), "labels": self.images.labels[i]}


def collate_images(batch: Sequence[dict]) -> dict:
    """Stack pixel values and labels into tensors."""
    import torch

    return {"pixel_values": torch.stack([b["pixel_values"] for b in batch]),
            "labels": torch.tensor([b["labels"] for b in batch], dtype=torch.long)}
