"""Few-shot vision recipe: each test checks a property against an independent reference (class counts from the
labels, the parameter formulas of each method, a brute-force nearest neighbour, the MAE encoder's own output,
numpy's mean/std of the recorded runs)."""

import json

import numpy as np
import pytest
import torch

from recipes.cli import RecipeError
from recipes.config import load_config
from recipes.vision import (
    METHOD_PRESETS,
    VisionConfig,
    classifier_features,
    load_base_model,
    main,
    nearest_neighbour_top1,
    prepare_model,
    trainable_parameters,
    validate,
)
from recipes.vision_data import (
    DataError,
    ImageTransform,
    LabeledImages,
    TransformedImages,
    holdout_indices,
    kshot_indices,
    load_splits,
    random_resized_crop_box,
)

from .conftest import REPO_ROOT, shared_data_dir, write_image_folder

CIFAR = shared_data_dir() / "cifar10"
needs_cifar = pytest.mark.skipif(not (CIFAR / "cifar10_train_first100perclass.tar").is_file(),
                                 reason=f"CIFAR-10 subset not found in {CIFAR} (set PEFT_NOLA_DATA_DIR)")


@pytest.fixture(scope="module")
def cifar_splits():
    if not (CIFAR / "cifar10_train_first100perclass.tar").is_file():
        pytest.skip(f"CIFAR-10 subset not found in {CIFAR} (set PEFT_NOLA_DATA_DIR)")
    return load_splits(CIFAR)


# ------------------------------------------------------------------------------------------------ k-shot sampler
@needs_cifar
@pytest.mark.parametrize("shots", [1, 5, 10])
def test_kshot_exact_count_per_class_without_replacement(cifar_splits, shots):
    train, _ = cifar_splits
    chosen = kshot_indices(train.labels, shots, seed=3)
    assert len(set(chosen)) == len(chosen) == shots * 10
    per_class = np.bincount([train.labels[i] for i in chosen], minlength=10)
    assert per_class.tolist() == [shots] * 10


def test_kshot_seeds_differ_and_repeat():
    labels = [c for c in range(7) for _ in range(40)]
    a0, a0_again, a1 = (kshot_indices(labels, 5, seed) for seed in (0, 0, 1))
    assert a0 == a0_again
    assert set(a0) != set(a1)
    # Sets for different seeds differ in every class, not just somewhere (each class has its own draw).
    for c in range(7):
        assert {i for i in a0 if labels[i] == c} != {i for i in a1 if labels[i] == c}
    # For one seed, the 5-shot set is contained in the 10-shot set (one permutation per class).
    assert set(a0) <= set(kshot_indices(labels, 10, 0))


@needs_cifar
def test_kshot_never_touches_validation_holdout_or_test_split(cifar_splits):
    train, test = cifar_splits
    held_out = holdout_indices(train.labels, 10, seed=1000)
    assert np.bincount([train.labels[i] for i in held_out]).tolist() == [10] * 10
    test_names = set(test.names)
    for seed in range(4):
        chosen = kshot_indices(train.labels, 10, seed, exclude=held_out)
        assert not set(chosen) & set(held_out)
        names = [train.names[i] for i in chosen]
        assert all(n.startswith("train/") for n in names) and not set(names) & test_names
    # The tar holds the standard splits: 100 train images per class here and the full 10,000-image test set.
    assert train.class_counts() == [100] * 10 and test.class_counts() == [1000] * 10


def test_kshot_too_few_images_names_the_class():
    labels = [0] * 6 + [1] * 3 + [2] * 6
    with pytest.raises(DataError, match=r"class 'cat' has 3 images .* 5 are needed"):
        kshot_indices(labels, 5, 0, class_names=["dog", "cat", "owl"])
    # Images held out for validation do not count as available.
    with pytest.raises(DataError, match="class 'dog' has 4 images"):
        kshot_indices(labels, 5, 0, exclude=[0, 1], class_names=["dog", "cat", "owl"])


# ------------------------------------------------------------------------------------------- parameter counts
def _meta_vit(hidden, inter, layers, heads):
    from transformers import AutoModelForImageClassification, ViTConfig

    with torch.device("meta"):
        return AutoModelForImageClassification.from_config(ViTConfig(
            hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
            num_labels=10))


@pytest.mark.parametrize("size, dims, expected", [
    ("ViT-B", (768, 3072, 12, 12), {
        "nola_mlp": 12 * 2 * 2000, "nola_qv": 12 * 2 * 2000, "lora_r4": 12 * 3 * 4 * (768 + 768),
        "lora_r1": 12 * 3 * 1 * (768 + 768), "lora_qv_r4": 12 * 2 * 4 * (768 + 768), "linear": 0}),
    ("ViT-L", (1024, 4096, 24, 16), {
        "nola_mlp": 24 * 2 * 2000, "lora_r4": 24 * 3 * 4 * 2048, "lora_qv_r4": 24 * 2 * 4 * 2048, "linear": 0}),
])
def test_method_parameter_counts_on_meta_vit(size, dims, expected):
    base = _meta_vit(*dims)
    cfg = VisionConfig(num_basis_A=1000, num_basis_B=1000)
    hidden = dims[0]
    for method, count in expected.items():
        model = prepare_model(cfg, base, method, seed=0)
        body, head = trainable_parameters(model, "classifier")
        assert body == count, (size, method)
        assert head == hidden * 10 + 10, (size, method)  # the head trains in every method, counted apart
    assert body == 0  # linear: head only
    # ViT-B NOLA-MLP at k=l=1000 is the paper's 47K row (printed as n / 2**20): exactly 48,000, with rank 4 for
    # ViT-B and 1 for ViT-L.
    model = prepare_model(cfg, base, "nola_mlp", seed=0)
    assert model.peft_config["default"].r == (4 if size == "ViT-B" else 1)
    if size == "ViT-B":
        assert trainable_parameters(model, "classifier")[0] == 48_000
    full = prepare_model(cfg, base, "full", seed=0)
    total = sum(p.numel() for p in base.parameters())
    assert trainable_parameters(full, "classifier") == (total - (hidden * 10 + 10), hidden * 10 + 10)


# ---------------------------------------------------------------------------------------------- 1-NN / features
def test_nearest_neighbour_matches_brute_force():
    rng = np.random.default_rng(0)
    train = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(12, 5))).float(), dim=-1)
    test = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(30, 5))).float(), dim=-1)
    train_labels = rng.integers(0, 3, 12)
    test_labels = rng.integers(0, 3, 30)
    expected = []
    for t in test.numpy():
        angles = [np.arccos(np.clip(np.dot(t, x), -1, 1)) for x in train.numpy()]  # smallest angle = most similar
        expected.append(train_labels[int(np.argmin(angles))])
    reference = float(np.mean(np.asarray(expected) == test_labels) * 100)
    assert nearest_neighbour_top1(train, train_labels, test, test_labels) == pytest.approx(reference)


def _tiny_vit_config(**extra):
    return dict(model_type="vit", image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=2, intermediate_size=64, **extra)


def _random_images(n, size=20, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    return LabeledImages(["a", "b"], [i % 2 for i in range(n)], [f"img{i}" for i in range(n)],
                         lambda i: Image.fromarray(arrays[i]))


def test_classifier_features_are_the_normalised_cls_token():
    cfg = VisionConfig(model_config=_tiny_vit_config())
    model = load_base_model(cfg, ["a", "b"]).eval()
    images = TransformedImages(_random_images(5), ImageTransform(16))
    features = classifier_features(model, images, "classifier", batch_size=2)
    pixels = torch.stack([images[i]["pixel_values"] for i in range(5)])
    with torch.no_grad():
        cls = model.vit(pixel_values=pixels).last_hidden_state[:, 0]
    assert torch.allclose(features, cls / cls.norm(dim=-1, keepdim=True), atol=1e-6)


def test_mae_checkpoint_loads_as_vit_with_the_same_encoder_output(tmp_path):
    from transformers import ViTMAEConfig, ViTMAEModel

    torch.manual_seed(0)
    mae_config = ViTMAEConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, mask_ratio=0.0)
    ViTMAEModel(mae_config).save_pretrained(tmp_path / "mae")
    mae = ViTMAEModel.from_pretrained(tmp_path / "mae").eval()
    model = load_base_model(VisionConfig(model_name_or_path=str(tmp_path / "mae")), ["a", "b", "c"]).eval()
    assert model.config.num_labels == 3
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # With mask_ratio 0 MAE keeps every patch (in a shuffled order); the CLS token does not depend on the order.
        expected = mae(pixel_values=pixels).last_hidden_state[:, 0]
        got = model.vit(pixel_values=pixels).last_hidden_state[:, 0]
    assert torch.allclose(got, expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------- transforms
def test_eval_transform_normalises_with_the_given_statistics():
    from PIL import Image

    image = Image.new("RGB", (40, 30), (51, 102, 204))
    out = ImageTransform(24, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))(image)
    assert out.shape == (3, 24, 24) and out.dtype == np.float32
    expected = [(51 / 255 - 0.5) / 0.2, (102 / 255 - 0.4) / 0.25, (204 / 255 - 0.3) / 0.5]
    assert np.allclose(out.reshape(3, -1).mean(1), expected, atol=1e-5)
    assert np.allclose(out.reshape(3, -1).std(1), 0, atol=1e-5)


def test_random_resized_crop_stays_inside_and_within_scale():
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = int(rng.integers(100, 400)), int(rng.integers(100, 400))
        left, top, right, bottom = random_resized_crop_box(w, h, rng)
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
        area = (right - left) * (bottom - top) / (w * h)
        aspect = (right - left) / (bottom - top)
        # Either a sampled crop (scale 0.2-1 and ratio 3/4-4/3, up to rounding sides to whole pixels) or the centred
        # fallback clamped to the ratio range (at least 1/3 of the area for these sizes).
        assert 0.19 <= area <= 1.0 and 0.74 <= aspect <= 1.35


# ------------------------------------------------------------------------------------------------- bad input


def _tiny_argv(data_dir, out, *extra):
    return ["--model_config", json.dumps(_tiny_vit_config()), "--data_dir", str(data_dir), "--output_dir", str(out),
            "--methods", "linear", "--shots", "2", "--sample_sets", "1", "--inits", "1", "--val_per_class", "0",
            "--lr_grid", "1e-3", "--epochs", "1", "--disable_tqdm", "true", *extra]


def test_unreadable_image_is_named_before_training(tmp_path):
    write_image_folder(tmp_path / "data", {"a": 3, "b": 2}, corrupt="b/broken.jpg")  # 3-shot samples every b image
    with pytest.raises(RecipeError, match=r"cannot read image 'train/b/broken.jpg'"):
        main(_tiny_argv(tmp_path / "data", tmp_path / "out", "--shots", "3"))
    assert not (tmp_path / "out" / "runs").exists()


def test_too_few_images_and_label_count_mismatch_are_clear_errors(tmp_path):
    write_image_folder(tmp_path / "data", {"a": 3, "b": 1})
    with pytest.raises(RecipeError, match="class 'b' has 1 images"):
        main(_tiny_argv(tmp_path / "data", tmp_path / "out"))
    write_image_folder(tmp_path / "data2", {"a": 3, "b": 3})
    with pytest.raises(RecipeError, match="num_labels 5 but the dataset has 2 classes"):
        main(_tiny_argv(tmp_path / "data2", tmp_path / "out", "--model_config",
                        json.dumps(_tiny_vit_config(num_labels=5))))
    with pytest.raises(RecipeError, match="num_labels is 7 but the dataset has 2 classes"):
        main(_tiny_argv(tmp_path / "data2", tmp_path / "out", "--num_labels", "7"))
    with pytest.raises(RecipeError, match="unknown method"):
        main(_tiny_argv(tmp_path / "data2", tmp_path / "out", "--methods", "lora,adapter"))


# ---------------------------------------------------------------------------------------- end to end (smoke)
@needs_cifar
def test_smoke_config_end_to_end(tmp_path):
    """The CI smoke run: sampling, LR selection, every method, aggregation, results.json + results.md."""
    results = main(["--config", str(REPO_ROOT / "configs/vision/smoke.yaml"), "--output_dir", str(tmp_path),
                    "--data_dir", str(CIFAR)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["metrics"] == pytest.approx(results["metrics"])
    for key in ("recipe", "config", "method", "trainable_params", "adapter_bytes", "metrics", "base_metrics",
                "wall_time_s", "peak_memory_bytes"):
        assert key in saved
    cfg = saved["config"]
    assert set(saved["per_method"]) == set(cfg["methods"]) == {"nola_mlp", "nola_qv", "lora_r4", "lora_r1", "linear",
                                                                "full", "knn"}
    layers, hidden, inter, k = 2, 32, 64, cfg["num_basis_A"]
    from transformers import AutoConfig, AutoModelForImageClassification

    kwargs = dict(cfg["model_config"]); kwargs.pop("init_seed"); kwargs.pop("model_type")
    fresh = AutoModelForImageClassification.from_config(AutoConfig.for_model("vit", num_labels=10, **kwargs))
    expected_params = {
        "nola_mlp": layers * 2 * 2 * k, "nola_qv": layers * 2 * 2 * k, "lora_r4": layers * 3 * 4 * 2 * hidden,
        "lora_r1": layers * 3 * 1 * 2 * hidden, "linear": 0, "knn": 0,
        "full": sum(p.numel() for p in fresh.parameters()) - (hidden * 10 + 10),
    }
    shots = str(cfg["shots"][0])
    for method, entry in saved["per_method"].items():
        cell = entry["shots"][shots]
        runs = cell["runs"]
        n_runs = cfg["sample_sets"] * (1 if method == "knn" else cfg["inits"])
        assert len(runs) == n_runs, method
        assert {(r["sample_set"], r["init"]) for r in runs} == (
            {(s, None) for s in range(cfg["sample_sets"])} if method == "knn"
            else {(s, i) for s in range(cfg["sample_sets"]) for i in range(cfg["inits"])})
        top1 = [r["top1"] for r in runs]
        assert all(0 <= t <= 100 for t in top1)
        # 100 test images: every accuracy is a whole percent.
        assert all(abs(t - round(t)) < 1e-9 for t in top1)
        assert cell["top1_mean"] == pytest.approx(np.mean(top1)) and cell["top1_std"] == pytest.approx(np.std(top1))
        assert entry["trainable_params"] == expected_params[method], method
        if METHOD_PRESETS[method]["kind"] not in ("knn",):
            grid = cfg["lr_grid_full"] if method == "full" else cfg["lr_grid"]
            assert cell["learning_rate"] in grid and set(cell["lr_search_val_top1"]) == {f"{x:g}" for x in grid}
            best = max(cell["lr_search_val_top1"].values())
            assert cell["lr_search_val_top1"][f"{cell['learning_rate']:g}"] == best
        assert saved["metrics"][f"top1/{method}/{shots}shot"] == pytest.approx(cell["top1_mean"])
    assert saved["metrics"]["top1"] == saved["per_method"]["nola_mlp"]["shots"][shots]["top1_mean"]
    assert saved["test_images"] == 100 and saved["top1_unit"] == "percent"
    table = (tmp_path / "results.md").read_text()
    assert "| NOLA-MLP | 1,600 |" in table and "1-NN" in table and "CIFAR-10 (subset) 2-shot" in table
    # The first run of each adapter method is saved: NOLA's file holds coefficients (+ the head), a few KB.
    assert (tmp_path / "adapters" / f"{shots}shot" / "nola_mlp" / "adapter_model.safetensors").is_file()
    assert 0 < saved["per_method"]["nola_mlp"]["adapter_bytes"] < 20_000


# ------------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs" / "vision").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_vision_config_loads_and_follows_the_paper_protocol(path):
    cfg = load_config(VisionConfig, [], config_path=path)
    validate(cfg)
    if path.stem == "smoke":
        assert cfg.model_config is not None  # offline: built from a config, no download
        return
    assert (cfg.sample_sets, cfg.inits, cfg.epochs, cfg.batch_size) == (4, 3, 50, 64)
    assert set(cfg.shots) <= {5, 10} and cfg.lr_grid == [5e-3, 1e-3, 5e-4]
    assert cfg.lr_grid_full == [8e-5, 5e-5, 3e-5, 1e-5]
    assert cfg.num_basis_A == cfg.num_basis_B == 1024 and cfg.nola_r is None


def test_missing_model_path_fails_before_reading_data(tmp_path):
    with pytest.raises(RecipeError, match="model path not found: /nonexistent/vit"):
        main(["--config", str(REPO_ROOT / "configs/vision/vitb_cifar10_5shot_nola_mlp.yaml"),
              "--model_name_or_path", "/nonexistent/vit", "--data_dir", "/nonexistent/data"])


def test_training_learns_a_separable_task_and_updates_the_adapter(tmp_path):
    """Dark vs bright noise images: a pipeline that pairs images with their labels correctly reaches 100% on unseen
    test images (a label/image mix-up would sit near 50%), and NOLA's output-side coefficients (zero at init) move."""
    from PIL import Image
    from safetensors.torch import load_file

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 10)):
        for cls, (lo, hi) in {"bright": (145, 256), "dark": (0, 110)}.items():
            (tmp_path / "data" / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(lo, hi, (16, 16, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / cls / f"{i}.png")
    results = main(_tiny_argv(tmp_path / "data", tmp_path / "out", "--methods", "nola_mlp,linear,knn", "--shots", "4",
                              "--lr_grid", "1e-2", "--epochs", "10", "--augment", "flip", "--num_basis_A", "64",
                              "--num_basis_B", "64"))
    for method in ("nola_mlp", "linear", "knn"):
        assert results["metrics"][f"top1/{method}/4shot"] == 100.0, method
    coefficients = load_file(str(tmp_path / "out" / "adapters" / "4shot" / "nola_mlp" / "adapter_model.safetensors"))
    beta = [v for k, v in coefficients.items() if "nola_coef_B" in k]
    assert len(beta) == 2 * 2 and all(v.abs().max() > 0 for v in beta)


def test_resume_reuses_finished_runs_only_under_the_same_settings(tmp_path):
    write_image_folder(tmp_path / "data", {"a": 3, "b": 3})
    argv = _tiny_argv(tmp_path / "data", tmp_path / "out", "--resume", "true")
    first = main(argv)
    record = next((tmp_path / "out" / "runs").rglob("test_*.json"))
    stamp = record.stat().st_mtime_ns
    again = main(argv)
    assert record.stat().st_mtime_ns == stamp  # not retrained
    assert again["per_method"]["linear"]["shots"]["2"]["runs"] == first["per_method"]["linear"]["shots"]["2"]["runs"]
    main(argv + ["--epochs", "2"])  # a setting that changes the result: the run is redone
    assert json.loads(record.read_text())["fingerprint"] != first["per_method"]["linear"]["shots"]["2"]["runs"][0]["fingerprint"]


def test_hf_datasets_folder_reads_classes_labels_and_pixels(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as ImageFeature
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays = {split: [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(6)] for split in ("train", "test")}
    features = Features({"img": ImageFeature(), "fine_label": ClassLabel(names=["owl", "cat", "dog"])})
    DatasetDict({
        split: Dataset.from_dict({"img": [Image.fromarray(a) for a in arrays[split]],
                                  "fine_label": [i % 3 for i in range(6)]}, features=features)
        for split in ("train", "test")
    }).save_to_disk(str(tmp_path / "hf"))
    train, test = load_splits(tmp_path / "hf", exclude_classes=["dog"])
    assert train.classes == ["owl", "cat"] and train.labels == [0, 1, 0, 1] and test.class_counts() == [2, 2]
    kept = [i for i in range(6) if i % 3 != 2]
    assert np.array_equal(np.asarray(train.read(1)), arrays["train"][kept[1]])  # PNG round trip is lossless
    assert np.array_equal(np.asarray(test.read(3)), arrays["test"][kept[3]])
