"""AAN citation matching (LRA "Retrieval"): two byte-level documents per example, one label.

Files: ``<data-dir>/tsv_data/new_aan_pairs.{train,eval,test}.tsv`` from the LRA release
(``run_lra.py download --tasks retrieval``, or by hand: https://storage.googleapis.com/long-range-arena/lra_release.gz,
a gzipped tar: ``tar xvf`` it and copy or link ``lra_release/lra_release/tsv_data`` into ``<data-dir>``). Each line holds 5
tab-separated fields ``label, id1, id2, text1, text2``, with no header and no quoting (the official
``make_csv_dataset(..., use_quote_delim=False, header=False)``, spec §2.3); ``eval`` is the val split.

Tokens: each document's first 10,000 bytes, + 1 (``ByteTextEncoder``), then the first ``max_length``
(4000) tokens, exactly as the official ``encoder.encode(s[:10000])[:max_length]``. Both documents go
through one shared encoder (two towers, one set of weights; :class:`models.blocks.DualClassifier`).

The official batches val and test with ``drop_remainder=True``, so its numbers leave out the last
partial batch (spec §11, quirk 6); we evaluate every example.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator

from lra_dtn.config import ModelConfig, TrainConfig
from lra_dtn.data import DataError
from lra_dtn.download import LRA_RELEASE, release_folder
from tasks.base import (CPU_SHAPE, SMOKE_SHAPE, Presets, SmallPreset, SplitLimits, Task, register_task, require,
                        smoke_train, tsv_records)
from tasks.text import BYTE_VOCAB_SIZE, encode_bytes

SPLIT_FILES = {"train": "train", "val": "eval", "test": "test"}  # our split -> the release's suffix
DOC_BYTES = 10_000  # the official cut before encoding
HEADS = {"concat": "[u, v] (official)", "nli": "[u, v, u*v, u-v] (NLI, common reimplementation)"}
POOLING = {"first": "first-byte (official 'CLS')", "cls": "CLS-token"}


@dataclass(frozen=True)
class RetrievalData(SplitLimits):
    """``max_length``: tokens per document (official 4000)."""

    max_length: int = 4000


def pair_file(data_dir: Path, split: str) -> Path:
    return Path(data_dir) / "tsv_data" / f"new_aan_pairs.{SPLIT_FILES[split]}.tsv"


def read_pairs(path: Path, max_length: int) -> Iterator[dict[str, Any]]:
    """Tokenized document pairs of one release TSV, as bytes: records end where the official reader ends
    them (``\\n``, ``\\r``, ``\\r\\n``: :func:`tasks.base.tsv_records`), fields at ``\\t``, no quote handling.

    A malformed record raises :class:`DataError` naming the file and the line number."""
    for lineno, line in tsv_records(path):
        fields = line.split(b"\t")
        if len(fields) != 5:
            raise DataError(f"{path}:{lineno}: expected 5 tab-separated fields (label, id1, id2, text1, text2), "
                            f"found {len(fields)}: {line[:60]!r}")
        try:
            label = int(float(fields[0]))  # read as float32 and cast to int32 officially
        except (ValueError, OverflowError):
            label = None
        if label not in (0, 1):
            raise DataError(f"{path}:{lineno}: expected a label 0 or 1 in the first field, "
                            f"found {fields[0][:20]!r}")
        yield {"input_ids": encode_bytes(fields[3][:DOC_BYTES])[:max_length],
               "input_ids2": encode_bytes(fields[4][:DOC_BYTES])[:max_length],
               "label": label}


# ---------------------------------------------------------------------------------------------
# The task and its configs

# LRA matching/configs/base_match_config.py (spec §7.1); BigBird and Reformer use it unchanged (§7.3,
# §7.4). Warmup 8000 > 5000 steps is official: the lr is still rising when training stops (§11, quirk 4).
# dual_head "concat" is the official [u, v] head; "nli" ([u, v, u*v, u-v]) is the common
# reimplementation (spec §9). Pooling: the official dual encoder adds no CLS token, so its "CLS" pooling
# reads position 0, the first *byte* of each document (§11, quirk 5): pooling "first" does exactly that.
# The common reimplementation is --set model.dual_head=nli --set model.pooling=mean.
OFFICIAL_MODEL = ModelConfig(vocab_size=BYTE_VOCAB_SIZE, num_classes=2, max_len=4000, num_layers=4, emb_dim=128,
                             qkv_dim=128, mlp_dim=512, num_heads=4, dropout=0.1, attn_dropout=0.1,
                             pooling="first", pos_emb="sinusoidal", dual_head="concat")
OFFICIAL_TRAIN = TrainConfig(batch_size=32, steps=5000, lr=0.05, schedule="rsqrt", warmup=8000,
                             weight_decay=0.1, eval_every=100, checkpoint_every=500)

# cpu: 256 bytes per document (two towers) and a 2-layer model, 0.6 CPU-seconds a step (measured with 2
# threads, random tokens), so 800 steps take about 6 minutes on 2 cores; val/test are the first
# 1,000/5,000 pairs of their files. smoke: a few dozen pairs, seconds.
CPU_DATA = RetrievalData(max_length=256, max_val=1_000, max_test=5_000)
CPU_TRAIN = replace(OFFICIAL_TRAIN, steps=800, warmup=200, eval_every=200, checkpoint_every=200)
SMOKE_DATA = RetrievalData(max_length=64, max_train=32, max_val=16, max_test=16)
PRESETS = Presets(
    models={"transformer": OFFICIAL_MODEL}, train=OFFICIAL_TRAIN, data=RetrievalData(),
    cpu=SmallPreset(model=dict(CPU_SHAPE, max_len=CPU_DATA.max_length), train=CPU_TRAIN, data=CPU_DATA),
    smoke=SmallPreset(model=dict(SMOKE_SHAPE, max_len=SMOKE_DATA.max_length), train=smoke_train(OFFICIAL_TRAIN),
                      data=SMOKE_DATA))


@register_task
class Retrieval(Task):
    name = "retrieval"
    presets = PRESETS
    dual = True
    tokenizer_version = 2  # 2: \r ends a record (as CsvDataset), no longer a token; length = the longer document
    sources = (release_folder("tsv_data"),)

    def source_files(self, data_dir: Path, options: RetrievalData) -> list[Path]:
        return [require(pair_file(data_dir, split), f"the LRA release file lra_release/tsv_data/"
                        f"{pair_file(data_dir, split).name} ({LRA_RELEASE.url}; tar xvf it and copy or link "
                        f"lra_release/lra_release/tsv_data into --data-dir)")
                for split in SPLIT_FILES]

    def read(self, data_dir: Path, options: RetrievalData) -> dict[str, Iterable[dict[str, Any]]]:
        return {split: islice(read_pairs(pair_file(data_dir, split), options.max_length), options.limit(split))
                for split in SPLIT_FILES}

    def describe(self, options: RetrievalData, model: ModelConfig | None = None) -> str:
        """The data line; with the run's ``model`` config it also names the head and pooling that ran."""
        text = f"AAN bytes, {options.max_length} per document, no eval example dropped{options.describe_limits()}"
        if model is not None:
            text += f"; head {HEADS[model.dual_head]}, {POOLING.get(model.pooling, model.pooling)} pooling"
        return text
