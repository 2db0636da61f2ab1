"""CIFAR-10 as 1024 grayscale pixels (LRA "Image"): reading the python release, the official
grayscale conversion, and the per-model official configs.

Files: ``<data-dir>/cifar-10-batches-py/{data_batch_1..5,test_batch}``, the CIFAR-10 python release
(https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, unpacked into ``<data-dir>``). Each file is
a pickle of ``{b"data": uint8 (N, 3072), b"labels": [N ints 0-9], ...}``; a row holds the R, G and B
planes of a 32x32 image one after the other, each in raster order.

Splits: train = the first 90% (45,000) of data_batch_1..5 in file order, val = the last 10% (5,000),
test = test_batch (10,000). The official ``train[:90%]``/``train[90%:]`` slices TFDS's own example order,
which only TFDS reproduces (spec §2.4); ours is the same sizes from the release's order.

Tokens: ``tf.image.rgb_to_grayscale`` of the uint8 image as in the official pipeline, i.e. the pixel
level 0..255 itself is the token (vocab 256), raster order. The official attention mask is
``inputs > 0``, which treats black pixels as padding (spec §6, §11 quirk 1); here that is the
``mask_zero_tokens`` option, off by default, so a 0 pixel is a real token.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from lra_dtn.config import ModelConfig, TrainConfig
from lra_dtn.data import DataError
from lra_dtn.download import CIFAR10, Source
from tasks.base import (SMOKE_SHAPE, Presets, SmallPreset, SplitLimits, Task, pixel_zero_rule, register_task, require,
                        smoke_train)

CIFAR_WHAT = f"the CIFAR-10 python release ({CIFAR10.url}, unpacked into --data-dir)"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
SIDE = 32
NUM_CLASSES = 10

# TF ``rgb_to_grayscale`` (python/ops/image_ops_impl.py): ``convert_image_dtype`` to float32 (x * (1/255)),
# a dot product with these weights, then ``convert_image_dtype`` back to uint8: * 255.5 and a truncating cast.
GRAY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], dtype=np.float32)


def grayscale(rgb: np.ndarray) -> np.ndarray:
    """``(..., 3)`` uint8 RGB -> ``(...)`` uint8 gray, in float32 as TF computes it.

    float32 matters: on 204 of the 2^24 RGB triples every float32 evaluation order gives one level
    more than exact arithmetic would (e.g. (0, 122, 186): exactly 92.999996, in float32 93.0 -> 93).
    Another 31-47 triples depend on the order and fusing of the three products inside TF's kernel,
    which cannot be pinned without TF; we sum left to right (R, G, B) with separate roundings."""
    x = rgb.astype(np.float32) * np.float32(1 / 255)
    gray = (x[..., 0] * GRAY_WEIGHTS[0] + x[..., 1] * GRAY_WEIGHTS[1]) + x[..., 2] * GRAY_WEIGHTS[2]
    return (gray * np.float32(255.5)).astype(np.uint8)  # values stay in [0, 255.48]: the cast truncates


def to_tokens(rows: np.ndarray) -> np.ndarray:
    """Release rows ``(N, 3072)`` (R, G, B planes) -> gray tokens ``(N, 1024)`` in raster order."""
    rgb = rows.reshape(len(rows), 3, SIDE * SIDE).transpose(0, 2, 1)  # (N, pixel, channel)
    return grayscale(rgb)


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds only NumPy arrays (and plain containers): a batch file cannot run code when read."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
        (module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                                      "numpy._core.numeric") for name in ("_reconstruct", "_frombuffer")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(rows (N, 3072) uint8, labels (N,) int64)`` of one release file; a file that is not a valid
    batch raises :class:`DataError` naming it."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()  # the files were pickled by Python 2
    except Exception as e:  # truncated or foreign files fail in many ways (EOFError, UnpicklingError, ...)
        raise DataError(f"{path}: not a readable CIFAR-10 python batch ({type(e).__name__}: {e}); "
                        f"expected {CIFAR_WHAT}") from e
    if not isinstance(batch, dict) or not {b"data", b"labels"} <= batch.keys():
        raise DataError(f"{path}: expected a dict with b'data' and b'labels' (the CIFAR-10 python release)")
    rows, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(rows, np.ndarray) or rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != 3 * SIDE * SIDE:
        raise DataError(f"{path}: b'data' must be uint8 of shape (N, {3 * SIDE * SIDE}), found "
                        f"{getattr(rows, 'dtype', type(rows).__name__)} {getattr(rows, 'shape', '')}")
    if labels.shape != (len(rows),) or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: b'labels' must be {len(rows)} integers, found {labels.dtype} {labels.shape}")
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        raise DataError(f"{path}: image {bad[0]} has label {labels[bad[0]]}, expected 0..{NUM_CLASSES - 1}")
    return rows, labels.astype(np.int64)


def read_batches(folder: Path, names: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and labels of several release files, concatenated in the given order."""
    rows, labels = zip(*(read_batch(folder / name) for name in names))
    return to_tokens(np.concatenate(rows)), np.concatenate(labels)


def examples(tokens: np.ndarray, labels: np.ndarray) -> Iterator[dict[str, Any]]:
    for ids, label in zip(tokens, labels):
        yield {"input_ids": ids, "label": int(label)}


@dataclass(frozen=True)
class ImageData(SplitLimits):
    """No parameter of its own: the official pipeline has none. ``mask_zero_tokens`` (the official
    mask quirk) is inherited and off by default."""


# ---------------------------------------------------------------------------------------------
# The task and its configs

# LRA image/configs/cifar10/base_cifar10_config.py + transformer_base.py at HEAD (spec §7.1, after
# ee6649e): 200 epochs of 175 steps at batch 256, warmup one epoch, cosine decay over all steps,
# evaluation once per epoch, no weight decay, no clipping, learned positions, CLS.
OFFICIAL_TRAIN = TrainConfig(batch_size=256, steps=35_000, lr=5e-4, schedule="cosine", warmup=175,
                             weight_decay=0.0, eval_every=175, checkpoint_every=1750)
# grid: the tokens are the 32x32 pixels (DTN takes its 2-D prior there; not an LRA setting).
TRANSFORMER = ModelConfig(vocab_size=256, num_classes=NUM_CLASSES, max_len=SIDE * SIDE, num_layers=1, emb_dim=128,
                          qkv_dim=64, mlp_dim=128, num_heads=8, dropout=0.3, attn_dropout=0.2,
                          pooling="cls", pos_emb="learned", grid=(SIDE, SIDE))
OFFICIAL_MODELS = {
    "transformer": TRANSFORMER,
    # bigbird_base.py (§7.3): block 64 and the dimensions above, but `config.model.num_head = 4`, a typo for
    # num_heads that the official model never receives. We apply the evident intent: 4 heads.
    "bigbird": replace(TRANSFORMER, num_heads=4, block_size=64),
    # reformer_base.py (§7.4). LSH parameters are ReformerAttention's hard-coded defaults (ModelConfig's).
    "reformer": replace(TRANSFORMER, num_layers=4, emb_dim=64, qkv_dim=32, mlp_dim=64, num_heads=8),
}

# cpu: the sequence stays 1024 pixels (shorter would be another task), so the cost is the attention
# matrix, batch x heads x 1025^2: each official model with 2 heads, no dropout (attention dropout alone
# took 15% of a step) and batch 16; the Transformer takes 0.42 CPU-seconds a step (measured with 2
# threads), so 1000 steps take about 5 minutes on 2 cores. val is the first 1,000 of the 5,000.
# smoke: a few dozen images, seconds.
CPU_DATA = ImageData(max_val=1_000)
SMOKE_DATA = ImageData(max_train=32, max_val=16, max_test=16)
PRESETS = Presets(
    models=OFFICIAL_MODELS, train=OFFICIAL_TRAIN, data=ImageData(),
    cpu=SmallPreset(model=dict(num_heads=2, dropout=0.0, attn_dropout=0.0),
                    train=replace(OFFICIAL_TRAIN, batch_size=16, steps=1000, lr=1e-3, warmup=100, eval_every=250,
                                  checkpoint_every=250),
                    data=CPU_DATA),
    # No attention dropout in smoke: drawing it over the 1025^2 matrix is 80% of a CPU step.
    smoke=SmallPreset(model=dict(SMOKE_SHAPE, attn_dropout=0.0), train=smoke_train(OFFICIAL_TRAIN), data=SMOKE_DATA))


@register_task
class Image(Task):
    name = "image"
    presets = PRESETS
    # 60,000 images of 3,072 bytes: 184 MB of pixels (the pickles add labels and names), for the estimate.
    sources = (Source(CIFAR10, "cifar-10-batches-py", "cifar-10-batches-py", approx_size=60_000 * 3072),)

    def folder(self, data_dir: Path) -> Path:
        return Path(data_dir) / "cifar-10-batches-py"

    def source_files(self, data_dir: Path, options: ImageData) -> list[Path]:
        return [require(self.folder(data_dir) / name, CIFAR_WHAT) for name in (*TRAIN_FILES, TEST_FILE)]

    def read(self, data_dir: Path, options: ImageData) -> dict[str, Iterable[dict[str, Any]]]:
        tokens, labels = read_batches(self.folder(data_dir), TRAIN_FILES)
        test_tokens, test_labels = read_batches(self.folder(data_dir), [TEST_FILE])
        cut = len(tokens) * 9 // 10  # 45,000 of 50,000
        splits = {"train": examples(tokens[:cut], labels[:cut]),
                  "val": examples(tokens[cut:], labels[cut:]),
                  "test": examples(test_tokens, test_labels)}
        return {split: islice(rows, options.limit(split)) for split, rows in splits.items()}

    def describe(self, options: ImageData, model: ModelConfig | None = None) -> str:
        zero = pixel_zero_rule(options, model)
        return f"CIFAR-10 gray (TF formula), 45k/5k/10k in file order, {zero}{options.describe_limits()}"
