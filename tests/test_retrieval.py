"""Retrieval (AAN pairs): release-format TSVs written here, the two-tower model and both heads."""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lra_dtn.config import Preset
from lra_dtn.data import DataError, collate
from lra_dtn.norms import NORMS
from models import MODELS, build_model
from tasks import TASKS
from tasks.retrieval import RetrievalData

SIZES = {"train": 20, "eval": 6, "test": 5}
# A quote is an ordinary byte (no quote handling); the label is a float; a CRLF line end is one break.
KNOWN = b'1.0\taan/1\taan/2\ta"b\td e\r\n'
KNOWN_IDS = ([ord("a") + 1, ord('"') + 1, ord("b") + 1], [ord("d") + 1, ord(" ") + 1, ord("e") + 1])
LONG = bytes(b for b in range(256) if b not in b"\t\n\r") * 45  # 11,220 bytes: cut at 10,000, then max_length


def line(label: str, text1: bytes, text2: bytes) -> bytes:
    return b"\t".join([label.encode(), b"id1", b"id2", text1, text2]) + b"\n"


def write_aan(root: Path) -> Path:
    folder = root / "tsv_data"
    folder.mkdir(parents=True)
    for suffix, n in SIZES.items():
        rows = [line(str(i % 2), f"left {i} {suffix}".encode(), f"right {i}".encode()) for i in range(n)]
        if suffix == "train":
            rows[0], rows[1] = KNOWN, line("0", LONG, b"x")
        (folder / f"new_aan_pairs.{suffix}.tsv").write_bytes(b"".join(rows))
    return root


@pytest.fixture
def aan(tmp_path: Path) -> Path:
    return write_aan(tmp_path / "data")


def ids(row) -> list[int]:
    return [int(i) for i in row]


def test_tokens_labels_and_splits(aan: Path, tmp_path: Path) -> None:
    task = TASKS.get("retrieval")()
    splits = task.load(aan, RetrievalData(), tmp_path / "cache")
    assert {k: len(v) for k, v in splits.items()} == {"train": 20, "val": 6, "test": 5}  # eval -> val
    train = splits["train"]
    assert (ids(train[0]["input_ids"]), ids(train[0]["input_ids2"])) == KNOWN_IDS and train[0]["label"] == 1
    assert list(train["label"][1:4]) == [0, 0, 1]
    long = ids(train[1]["input_ids"])
    assert len(long) == 4000 and long[:3] == [1, 2, 3] and ids(train[1]["input_ids2"]) == [ord("x") + 1]
    # The official cut to 10,000 bytes comes before the token limit.
    wide = task.load(aan, RetrievalData(max_length=20_000), tmp_path / "cache")["train"][1]["input_ids"]
    assert len(wide) == 10_000 and ids(wide) == [b + 1 for b in LONG[:10_000]]
    assert ids(splits["val"][5]["input_ids"]) == [b + 1 for b in b"left 5 eval"]


def test_limits_read_the_first_lines(aan: Path, tmp_path: Path) -> None:
    task = TASKS.get("retrieval")()
    splits = task.load(aan, RetrievalData(max_train=3, max_val=2, max_test=50), tmp_path / "cache")
    assert {k: len(v) for k, v in splits.items()} == {"train": 3, "val": 2, "test": 5}


@pytest.mark.parametrize("bad, message", [
    (b"1\tid1\tid2\tonly four fields\n", "expected 5 tab-separated fields"),
    (b"1\tid1\tid2\ttext\twith\ttabs\n", r"expected 5 .*, found 6"),
    (b"yes\tid1\tid2\ta\tb\n", "expected a label 0 or 1"),
    (b"2\tid1\tid2\ta\tb\n", "expected a label 0 or 1"),
    # \r ends a record for the official CsvDataset: a lone one cuts the line into two malformed records.
    (b"1\tid1\tid2\ta\rb\tc\n", "expected 5 .*, found 4"),
])
def test_malformed_line_names_file_and_line_and_caches_nothing(aan: Path, tmp_path: Path, bad: bytes,
                                                               message: str) -> None:
    task, cache = TASKS.get("retrieval")(), tmp_path / "cache"
    path = aan / "tsv_data" / "new_aan_pairs.eval.tsv"
    good = path.read_bytes()
    path.write_bytes(good + bad)
    with pytest.raises(DataError, match=f"{re.escape(str(path))}:7: {message}"):
        task.load(aan, RetrievalData(), cache)
    assert list(cache.iterdir()) == []  # neither a cache nor a leftover temporary folder
    path.write_bytes(good)
    assert len(task.load(aan, RetrievalData(), cache)["val"]) == 6


def test_missing_file_names_path_and_source(aan: Path, tmp_path: Path) -> None:
    (aan / "tsv_data" / "new_aan_pairs.test.tsv").unlink()
    with pytest.raises(DataError, match=r"missing .*tsv_data/new_aan_pairs\.test\.tsv: expected the LRA release "
                                        r"file lra_release/tsv_data/new_aan_pairs\.test\.tsv \(https://storage"):
        TASKS.get("retrieval")().load(aan, RetrievalData(), tmp_path / "cache")


@pytest.mark.parametrize("head, width", [("concat", 2), ("nli", 4)])
def test_both_heads(head: str, width: int, aan: Path, tmp_path: Path) -> None:
    task = TASKS.get("retrieval")()
    cfg, train_cfg, options = task.spec(Preset.smoke, "transformer")
    cfg = replace(cfg, dual_head=head)
    splits = task.load(aan, options, tmp_path / "cache")
    batch = collate(splits["train"], np.arange(train_cfg.batch_size))
    assert batch.ids2 is not None and batch.ids.shape == (train_cfg.batch_size, options.max_length)
    net = build_model("transformer", cfg, "ln", dual=task.dual)
    assert net.head[0].in_features == width * cfg.emb_dim
    assert [m.out_features for m in net.head if isinstance(m, torch.nn.Linear)] == [cfg.mlp_dim, cfg.mlp_dim // 2, 2]
    assert net(*batch.inputs()).shape == (train_cfg.batch_size, 2)
    # One shared encoder for both documents, then the head on [u, v] or [u, v, u*v, u-v].
    net.eval()
    u, v = net.encoder(batch.ids, batch.mask), net.encoder(batch.ids2, batch.mask2)
    features = [u, v] if head == "concat" else [u, v, u * v, u - v]
    torch.testing.assert_close(net(*batch.inputs()), net.head(torch.cat(features, dim=-1)))
    expected = {"concat": "head [u, v] (official), first-byte (official 'CLS') pooling",
                "nli": "head [u, v, u*v, u-v] (NLI, common reimplementation), first-byte (official 'CLS') pooling"}[head]
    assert task.describe(options, model=cfg).endswith(expected)
    assert u.shape == (train_cfg.batch_size, cfg.emb_dim) and net.encoder.embed.cls is None  # no CLS token added
    first = net.encoder.final_norm(net.encoder.blocks[0](net.encoder.embed(batch.ids, batch.mask)[0], batch.mask),
                                   batch.mask)[:, 0]
    torch.testing.assert_close(u, first)  # official "CLS": the final norm's output at the first byte


@pytest.mark.parametrize("model", MODELS.names())
def test_smoke_preset_end_to_end(model: str, aan: Path, tmp_path: Path) -> None:
    task = TASKS.get("retrieval")()
    cfg, train_cfg, options = task.spec(Preset.smoke, model)
    splits = task.load(aan, options, tmp_path / "cache")
    assert train_cfg.batch_size <= len(splits["train"])
    batch = collate(splits["train"], np.arange(train_cfg.batch_size), options.mask_zero_tokens)
    for norm in NORMS.names():
        torch.manual_seed(0)
        net = build_model(model, cfg, norm, seed=0, dual=task.dual)
        logits = net(*batch.inputs())
        assert logits.shape == (train_cfg.batch_size, 2) and torch.isfinite(logits).all()
        torch.nn.functional.cross_entropy(logits, batch.labels).backward()


def test_official_config() -> None:
    task = TASKS.get("retrieval")()
    for model in ("transformer", "bigbird", "reformer"):
        cfg, train, options = task.spec(Preset.official, model)
        assert (cfg.num_layers, cfg.emb_dim, cfg.qkv_dim, cfg.mlp_dim, cfg.num_heads) == (4, 128, 128, 512, 4)
        assert (cfg.vocab_size, cfg.max_len, options.max_length, cfg.dual_head) == (257, 4000, 4000, "concat")
        assert (train.batch_size, train.steps, train.lr, train.schedule, train.warmup, train.weight_decay) == (
            32, 5000, 0.05, "rsqrt", 8000, 0.1)
