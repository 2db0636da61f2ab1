"""Image (CIFAR-10 grayscale): the TF grayscale formula, release-format pickles written here, the
45k/5k-style split, the zero-pixel mask option and the per-model official configs."""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lra_dtn.config import Preset
from lra_dtn.data import DataError, collate
from lra_dtn.norms import NORMS
from models import MODELS, build_model
from tasks import TASKS
from tasks.image import ImageData, grayscale, to_tokens

PER_BATCH, TEST_SIZE = 4, 6  # 20 train images -> 18 train + 2 val


@pytest.mark.parametrize("rgb, gray", [
    ((255, 255, 255), 255),  # weights sum to 0.9999: 0.9999 * 255.5 = 255.47
    ((0, 0, 0), 0),
    ((255, 0, 0), 76),  # trunc(0.2989 * 255.5 = 76.37)
    ((0, 255, 0), 149),  # trunc(149.98): truncation, not rounding
    ((0, 0, 255), 29),
    ((1, 1, 1), 1),
    ((0, 122, 186), 93),  # exact arithmetic gives 92.999996 -> 92; TF's float32 gives 93.0 -> 93
    ((3, 254, 50), 156),  # likewise (exact 155.99...)
])
def test_grayscale_is_tf_float32(rgb: tuple[int, int, int], gray: int) -> None:
    assert grayscale(np.array(rgb, dtype=np.uint8)) == gray


def test_grayscale_matches_the_formula_up_to_float32() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (100_000, 3), dtype=np.uint8)
    exact = np.floor((rgb.astype(np.float64) @ [0.2989, 0.5870, 0.1140]) / 255 * 255.5)
    diff = grayscale(rgb).astype(np.float64) - exact
    assert set(np.unique(diff)) <= {0.0, 1.0} and np.count_nonzero(diff) < 10  # ~1.4e-5 of triples


def test_rows_are_rgb_planes_in_raster_order() -> None:
    row = np.zeros((1, 3072), dtype=np.uint8)
    row[0, 1] = 255  # red plane, pixel (0, 1)
    row[0, 1024 + 32] = 255  # green plane, pixel (1, 0)
    row[0, 2048 + 1023] = 255  # blue plane, pixel (31, 31)
    tokens = to_tokens(row)[0]
    assert tokens.shape == (1024,) and (tokens[1], tokens[32], tokens[1023]) == (76, 149, 29)
    assert np.count_nonzero(tokens) == 3


def batch_dict(rows: np.ndarray, labels: list[int], name: str) -> dict:
    """The release's layout: bytes keys, uint8 rows, a list of labels (Python 2 pickles)."""
    return {b"batch_label": name.encode(), b"labels": labels, b"data": rows,
            b"filenames": [f"img_{i}.png".encode() for i in range(len(rows))]}


def write_cifar(root: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Release-format batches of random images; returns the folder, all train rows and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 256, (5 * PER_BATCH + TEST_SIZE, 3072), dtype=np.uint8)
    for plane in range(3):  # four black pixels (all channels 0) at the start of every image
        rows[:, plane * 1024 : plane * 1024 + 4] = 0
    labels = (np.arange(len(rows)) * 3) % 10
    for i in range(5):
        part = slice(i * PER_BATCH, (i + 1) * PER_BATCH)
        dump(folder / f"data_batch_{i + 1}", batch_dict(rows[part], labels[part].tolist(), f"batch {i + 1}"))
    dump(folder / "test_batch", batch_dict(rows[-TEST_SIZE:], labels[-TEST_SIZE:].tolist(), "test"))
    return root, rows, labels


def dump(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


@pytest.fixture
def cifar(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    return write_cifar(tmp_path / "data")


def test_tokens_labels_and_splits(cifar, tmp_path: Path) -> None:
    data_dir, rows, labels = cifar
    splits = TASKS.get("image")().load(data_dir, ImageData(), tmp_path / "cache")
    assert {k: len(v) for k, v in splits.items()} == {"train": 18, "val": 2, "test": 6}
    # Train then val in file order (data_batch_1..5), test = test_batch.
    order = {"train": range(0, 18), "val": range(18, 20), "test": range(20, 26)}
    for split, index in order.items():
        assert list(splits[split]["label"]) == labels[index].tolist()
        np.testing.assert_array_equal(np.stack(splits[split]["input_ids"]), to_tokens(rows[index]))
    # Pixel (0, 1) of image 5 computed by hand from its three planes.
    r, g, b = (np.float32(rows[5, c * 1024 + 1]) * np.float32(1 / 255) for c in range(3))
    by_hand = int(((r * np.float32(0.2989) + g * np.float32(0.5870)) + b * np.float32(0.1140)) * np.float32(255.5))
    assert int(splits["train"][5]["input_ids"][1]) == by_hand


def test_zero_pixel_is_a_token_unless_masked(cifar, tmp_path: Path) -> None:
    task = TASKS.get("image")()
    splits = task.load(cifar[0], ImageData(), tmp_path / "cache")
    batch = collate(splits["train"], np.arange(4))
    assert batch.ids.shape == (4, 1024) and (batch.ids[:, :4] == 0).all() and batch.mask.all()
    quirk = collate(splits["train"], np.arange(4), mask_zero_tokens=True)
    assert torch.equal(quirk.mask, batch.ids != 0) and not quirk.mask[:, :4].any()
    assert "pixel 0 a real token" in task.describe(ImageData())
    assert "masked as padding" in task.describe(ImageData(mask_zero_tokens=True))


@pytest.mark.parametrize("corrupt, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "not a readable CIFAR-10 python batch"),
    (lambda p: dump(p, batch_dict(np.zeros((2, 3000), np.uint8), [0, 1], "x")), r"must be uint8 of shape \(N, 3072\)"),
    (lambda p: dump(p, batch_dict(np.zeros((2, 3072), np.uint8), [0, 10], "x")), "image 1 has label 10"),
    (lambda p: dump(p, batch_dict(np.zeros((2, 3072), np.uint8), [0], "x")), "must be 2 integers"),
    (lambda p: dump(p, [1, 2]), "expected a dict"),
    (lambda p: dump(p, os.system), r"unexpected object posix\.system"),  # a pickle never runs code here
])
def test_corrupt_batch_names_the_file_and_caches_nothing(cifar, tmp_path: Path, corrupt, message: str) -> None:
    task, cache = TASKS.get("image")(), tmp_path / "cache"
    path = cifar[0] / "cifar-10-batches-py" / "test_batch"
    good = path.read_bytes()
    corrupt(path)
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: .*{message}"):
        task.load(cifar[0], ImageData(), cache)
    assert list(cache.iterdir()) == []  # neither a cache nor a leftover temporary folder
    path.write_bytes(good)
    assert len(task.load(cifar[0], ImageData(), cache)["test"]) == TEST_SIZE


def test_missing_file_names_path_and_source(cifar, tmp_path: Path) -> None:
    (cifar[0] / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"missing .*cifar-10-batches-py/data_batch_3: expected the CIFAR-10 python "
                                        r"release \(https://www\.cs\.toronto\.edu/~kriz/cifar-10-python\.tar\.gz"):
        TASKS.get("image")().load(cifar[0], ImageData(), tmp_path / "cache")


@pytest.mark.parametrize("model", MODELS.names())
def test_smoke_preset_end_to_end(model: str, cifar, tmp_path: Path) -> None:
    task = TASKS.get("image")()
    cfg, train_cfg, options = task.spec(Preset.smoke, model)
    splits = task.load(cifar[0], options, tmp_path / "cache")
    assert train_cfg.batch_size <= len(splits["train"])
    batch = collate(splits["train"], np.arange(2), options.mask_zero_tokens)  # 2 of 1024 pixels: enough here
    for norm in NORMS.names():
        torch.manual_seed(0)
        net = build_model(model, cfg, norm, seed=0, dual=task.dual)
        logits = net(*batch.inputs())
        assert logits.shape == (2, 10) and torch.isfinite(logits).all()
        torch.nn.functional.cross_entropy(logits, batch.labels).backward()


def test_official_configs_per_model() -> None:
    task = TASKS.get("image")()
    shapes = {"transformer": (1, 128, 64, 128, 8), "bigbird": (1, 128, 64, 128, 4), "reformer": (4, 64, 32, 64, 8)}
    for model, shape in shapes.items():
        cfg, train, options = task.spec(Preset.official, model)
        assert (cfg.num_layers, cfg.emb_dim, cfg.qkv_dim, cfg.mlp_dim, cfg.num_heads) == shape
        assert (cfg.vocab_size, cfg.num_classes, cfg.max_len) == (256, 10, 1024)
        assert (cfg.pooling, cfg.pos_emb) == ("cls", "learned")
        assert (cfg.dropout, cfg.attn_dropout) == (0.3, 0.2)
        assert (train.batch_size, train.steps, train.lr, train.schedule, train.warmup, train.weight_decay) == (
            256, 35_000, 5e-4, "cosine", 175, 0.0)
        assert options == ImageData() and not options.mask_zero_tokens
    assert task.spec(Preset.official, "bigbird")[0].block_size == 64
