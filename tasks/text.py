"""IMDB byte-level sentiment (LRA "Text"): reading and tokenizing the Stanford release.

Files: ``<data-dir>/aclImdb/{train,test}/{pos,neg}/*.txt``, the Stanford IMDB release (``run_lra.py
download --tasks text``, or http://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz unpacked into
``<data-dir>``; the 50,000 unlabelled reviews in ``train/unsup`` are never read, nor downloaded). The
official pipeline reads the same 25k/25k reviews through TFDS ``imdb_reviews`` (spec §2.2), which
builds them from this archive: ``text = f.read().strip()`` on the raw bytes, label neg=0, pos=1
(TFDS ``text/imdb.py``). IMDB has no validation set, so the official val *is* the test set.

Tokens are the review's UTF-8 bytes + 1 (TFDS ``ByteTextEncoder``: ids 1..256, 0 is padding, vocab
257), cut to ``max_length``: 1000 in the official config, 4000 in the paper (spec §2.2, issue #21).
:func:`encode_bytes` is shared with Retrieval, which tokenizes its documents the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from lra_dtn.config import ModelConfig, TrainConfig
from lra_dtn.data import DataError
from lra_dtn.download import IMDB, Source
from tasks.base import (CPU_SHAPE, SMOKE_SHAPE, Presets, SmallPreset, SplitLimits, Task, register_task, require,
                        smoke_train)

IMDB_WHAT = f"the Stanford IMDB release ({IMDB.url}, unpacked into --data-dir)"
LABELS = {"neg": 0, "pos": 1}  # TFDS ClassLabel(names=["neg", "pos"])
BYTE_VOCAB_SIZE = 257  # ByteTextEncoder: 256 byte values shifted by one, plus padding 0


def encode_bytes(data: bytes) -> np.ndarray:
    """TFDS ``ByteTextEncoder().encode``: each byte + 1, so no real token is the padding id 0."""
    return np.frombuffer(data, dtype=np.uint8).astype(np.int16) + 1


@dataclass(frozen=True)
class TextData(SplitLimits):
    """``max_length``: 1000 = the official config, 4000 = the paper. A limit on a split takes half
    of it from each class."""

    max_length: int = 1000


def review_files(data_dir: Path, split: str) -> dict[str, list[Path]]:
    """``{"neg": [...], "pos": [...]}`` of one aclImdb split, sorted by name for a fixed order."""
    files = {}
    for name in LABELS:
        folder = require(Path(data_dir) / "aclImdb" / split / name, IMDB_WHAT)
        files[name] = sorted(folder.glob("*.txt"))
        if not files[name]:
            raise DataError(f"no *.txt reviews in {folder}: expected {IMDB_WHAT}")
    return files


def read_reviews(files: dict[str, list[Path]], max_length: int, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Tokenized reviews, all negatives then all positives; ``limit`` takes half from each class."""
    for name, label in LABELS.items():
        take = None if limit is None else (limit + 1 - label) // 2  # neg gets the odd one
        for path in islice(files[name], take):
            yield {"input_ids": encode_bytes(path.read_bytes().strip())[:max_length], "label": label}


# ---------------------------------------------------------------------------------------------
# The task and its configs

# LRA text_classification/configs/base_tc_config.py (spec §7.1; unchanged since the first commit).
# BigBird and Reformer use this base config unchanged (spec §7.3, §7.4). The official checkpoints every
# 10,000 steps; we checkpoint more often, which only matters for resuming.
OFFICIAL_MODEL = ModelConfig(vocab_size=BYTE_VOCAB_SIZE, num_classes=2, max_len=1000, num_layers=4, emb_dim=256,
                             qkv_dim=256, mlp_dim=1024, num_heads=4, dropout=0.1, attn_dropout=0.1,
                             pooling="cls", pos_emb="sinusoidal")
OFFICIAL_TRAIN = TrainConfig(batch_size=32, steps=20_000, lr=0.05, schedule="rsqrt", warmup=8000,
                             weight_decay=0.1, eval_every=100, checkpoint_every=500)

# cpu: 512 bytes and a 2-layer model, 0.45 CPU-seconds a step (measured with 2 threads, random tokens),
# so 800 steps take about 5 minutes on 2 cores; val is a balanced 1,000-review slice of the test set
# (evaluated often), test 5,000. smoke: a few dozen reviews, seconds.
CPU_DATA = TextData(max_length=512, max_val=1_000, max_test=5_000)
CPU_TRAIN = replace(OFFICIAL_TRAIN, steps=800, warmup=200, eval_every=200, checkpoint_every=200)
SMOKE_DATA = TextData(max_length=64, max_train=32, max_val=16, max_test=16)
PRESETS = Presets(
    models={"transformer": OFFICIAL_MODEL}, train=OFFICIAL_TRAIN, data=TextData(),
    cpu=SmallPreset(model=dict(CPU_SHAPE, max_len=CPU_DATA.max_length), train=CPU_TRAIN, data=CPU_DATA),
    smoke=SmallPreset(model=dict(SMOKE_SHAPE, max_len=SMOKE_DATA.max_length), train=smoke_train(OFFICIAL_TRAIN),
                      data=SMOKE_DATA))


@register_task
class Text(Task):
    name = "text"
    presets = PRESETS
    sources = (Source(IMDB, "aclImdb", "aclImdb", only=("README", "train/pos", "train/neg", "test/pos", "test/neg")),)

    def source_files(self, data_dir: Path, options: TextData) -> list[Path]:
        return [f for split in ("train", "test") for files in review_files(data_dir, split).values() for f in files]

    def read(self, data_dir: Path, options: TextData) -> dict[str, Iterable[dict[str, Any]]]:
        train, test = review_files(data_dir, "train"), review_files(data_dir, "test")
        return {"train": read_reviews(train, options.max_length, options.max_train),
                "val": read_reviews(test, options.max_length, options.max_val),  # val = test, as official
                "test": read_reviews(test, options.max_length, options.max_test)}

    def describe(self, options: TextData, model: ModelConfig | None = None) -> str:
        length = {1000: "1000 (official config)", 4000: "4000 (paper)"}.get(options.max_length, str(options.max_length))
        return f"IMDB bytes, length {length}, val = test{options.describe_limits()}"
