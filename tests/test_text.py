"""Text (IMDB bytes): an aclImdb tree written here, read through ``Task.load`` into model logits."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lra_dtn.config import Preset
from lra_dtn.data import DataError, collate
from lra_dtn.norms import NORMS
from models import MODELS, build_model
from tasks import TASKS
from tasks.text import TextData

# (split, class) -> number of reviews written; the first file of train/neg holds KNOWN.
SIZES = {("train", "neg"): 10, ("train", "pos"): 10, ("test", "neg"): 6, ("test", "pos"): 7}
KNOWN = " \tBad \xe9.\r\n".encode()  # TFDS strips the ASCII whitespace around the review
KNOWN_IDS = [ord("B") + 1, ord("a") + 1, ord("d") + 1, 33, 0xC3 + 1, 0xA9 + 1, ord(".") + 1]
LONG = bytes(range(256)) * 20  # 5120 bytes: cut at 1000 (official) or 4000 (paper)


def write_imdb(root: Path) -> Path:
    for (split, name), n in SIZES.items():
        folder = root / "aclImdb" / split / name
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"{i}_{7 if name == 'pos' else 2}.txt").write_bytes(f"{name} review {i} of {split}".encode())
    (root / "aclImdb" / "train" / "neg" / "0_2.txt").write_bytes(KNOWN)
    (root / "aclImdb" / "train" / "pos" / "0_7.txt").write_bytes(LONG)
    return root


@pytest.fixture
def imdb(tmp_path: Path) -> Path:
    return write_imdb(tmp_path / "data")


def ids(row) -> list[int]:
    return [int(i) for i in row]


def text_of(row) -> bytes:
    """The review bytes back from its token ids (id - 1)."""
    return bytes(int(i) - 1 for i in row)


def test_tokens_labels_and_splits(imdb: Path, tmp_path: Path) -> None:
    task = TASKS.get("text")()
    splits = task.load(imdb, TextData(), tmp_path / "cache")
    assert {k: len(v) for k, v in splits.items()} == {"train": 20, "val": 13, "test": 13}
    train = splits["train"]
    assert ids(train[0]["input_ids"]) == KNOWN_IDS and train[0]["label"] == 0
    assert list(train["label"]) == [0] * 10 + [1] * 10  # neg then pos, each sorted by file name
    assert text_of(train[1]["input_ids"]) == b"neg review 1 of train"
    long = ids(train[10]["input_ids"])
    assert len(long) == 1000 and long[:3] == [1, 2, 3] and max(long) == 256  # byte 255 -> 256, never 0
    # val is the IMDB test set, as in the official pipeline.
    assert [ids(r) for r in splits["val"]["input_ids"]] == [ids(r) for r in splits["test"]["input_ids"]]
    assert list(splits["test"]["label"]) == [0] * 6 + [1] * 7


def test_paper_length_and_limits(imdb: Path, tmp_path: Path) -> None:
    task = TASKS.get("text")()
    long = task.load(imdb, TextData(max_length=4000), tmp_path / "cache")["train"][10]["input_ids"]
    assert len(long) == 4000
    # A limit reads half of a split from each class (the odd one from neg).
    small = task.load(imdb, TextData(max_train=7, max_val=4, max_test=100), tmp_path / "cache")
    assert list(small["train"]["label"]) == [0] * 4 + [1] * 3
    assert list(small["val"]["label"]) == [0, 0, 1, 1]
    assert len(small["test"]) == 13
    assert "first 7/4/100" in task.describe(TextData(max_train=7, max_val=4, max_test=100))
    assert "1000 (official config)" in task.describe(TextData())


def test_missing_folder_names_path_and_source(imdb: Path, tmp_path: Path) -> None:
    task = TASKS.get("text")()
    for f in (imdb / "aclImdb" / "test" / "pos").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"no \*\.txt reviews in .*test/pos.*aclImdb_v1\.tar\.gz"):
        task.load(imdb, TextData(), tmp_path / "cache")
    (imdb / "aclImdb" / "test" / "pos").rmdir()
    with pytest.raises(DataError, match=r"missing .*aclImdb/test/pos: expected the Stanford IMDB release \(http"):
        task.load(imdb, TextData(), tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("text-*"))


def test_cache_follows_edits(imdb: Path, tmp_path: Path) -> None:
    task = TASKS.get("text")()
    assert task.load(imdb, TextData(), tmp_path / "cache")["train"][1]["label"] == 0
    (imdb / "aclImdb" / "train" / "neg" / "1_2.txt").write_bytes(b"edited, and longer than before")
    edited = task.load(imdb, TextData(), tmp_path / "cache")["train"][1]["input_ids"]
    assert text_of(edited) == b"edited, and longer than before"


@pytest.mark.parametrize("model", MODELS.names())
def test_smoke_preset_end_to_end(model: str, imdb: Path, tmp_path: Path) -> None:
    task = TASKS.get("text")()
    cfg, train_cfg, options = task.spec(Preset.smoke, model)
    splits = task.load(imdb, options, tmp_path / "cache")
    assert train_cfg.batch_size <= len(splits["train"])
    rows = np.arange(train_cfg.batch_size) + 4  # includes the long review: no padding for it
    batch = collate(splits["train"], rows, options.mask_zero_tokens)
    assert batch.ids.shape == (train_cfg.batch_size, options.max_length) and batch.ids.max() <= cfg.vocab_size - 1
    for norm in NORMS.names():
        torch.manual_seed(0)
        net = build_model(model, cfg, norm, seed=0, dual=task.dual)
        logits = net(*batch.inputs())
        assert logits.shape == (train_cfg.batch_size, 2) and torch.isfinite(logits).all()
        torch.nn.functional.cross_entropy(logits, batch.labels).backward()


def test_official_config() -> None:
    task = TASKS.get("text")()
    for model in ("transformer", "bigbird", "reformer"):  # one base config for every encoder (spec §7.3/7.4)
        cfg, train, options = task.spec(Preset.official, model)
        assert (cfg.num_layers, cfg.emb_dim, cfg.qkv_dim, cfg.mlp_dim, cfg.num_heads) == (4, 256, 256, 1024, 4)
        assert (cfg.vocab_size, cfg.num_classes, cfg.max_len, options.max_length) == (257, 2, 1000, 1000)
        assert (train.batch_size, train.steps, train.lr, train.schedule, train.warmup, train.weight_decay) == (
            32, 20_000, 0.05, "rsqrt", 8000, 0.1)
    for preset in (Preset.cpu, Preset.smoke):
        cfg, _, options = task.spec(preset, "transformer")
        assert cfg.max_len == options.max_length
