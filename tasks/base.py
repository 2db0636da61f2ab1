"""What every task module provides, and the registry that ``--task`` picks from.

A task module (``tasks/<name>.py``) defines one :class:`Task` subclass registered in :data:`TASKS`.
It states its three presets once, as one :class:`Presets` (the official LRA config, cited, and the
``cpu`` and ``smoke`` presets as changes to it), knows where its files live under ``--data-dir``,
makes them present in :meth:`Task.prepare` (ListOps and Pathfinder generate them), and reads and
tokenizes them exactly as the official pipeline. Data flows one way: the commands call ``prepare``
before training; ``load`` (the engine's) only reads.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Mapping

from lra_dtn.config import ModelConfig, Preset, TrainConfig
from lra_dtn.data import DataError, cached_splits, file_fingerprint
from lra_dtn.download import Source, human
from lra_dtn.registry import Registry


@dataclass(frozen=True)
class DataOptions:
    """Per-task data parameters; each task subclasses this with its own fields.

    ``mask_zero_tokens``: the official image-task quirk of treating token 0 as padding (§6)."""

    mask_zero_tokens: bool = False


def pixel_zero_rule(options: DataOptions, model: ModelConfig | None) -> str:
    """The image tasks' pixel-0 rule as the results table names it (``mask_zero_tokens``, or the official
    ``inputs > 0`` mask that ``official_quirks`` brings with it)."""
    if model is not None and model.official_quirks:
        return "official quirks (pixel 0 masked as the official inputs > 0 mask does)"
    return "pixel 0 masked as padding (official quirk)" if options.mask_zero_tokens else "pixel 0 a real token"


@dataclass(frozen=True)
class SplitLimits(DataOptions):
    """Read only the first ``n`` examples of a split (``None``: all), for the presets that must run
    in minutes (``cpu``: a smaller val/test evaluated often) or seconds (``smoke``). Shared by the
    tasks that read fixed official files; ListOps and Pathfinder generate the size they need."""

    max_train: int | None = None
    max_val: int | None = None
    max_test: int | None = None

    def limit(self, split: str) -> int | None:
        return {"train": self.max_train, "val": self.max_val, "test": self.max_test}[split]

    def describe_limits(self) -> str:
        """``", first 32/16/16 train/val/test examples"`` when part of a split is read, else ``""``."""
        limits = (self.max_train, self.max_val, self.max_test)
        if limits == (None, None, None):
            return ""
        return ", first " + "/".join("all" if n is None else str(n) for n in limits) + " train/val/test"


# The encoder shapes of the small presets: ``cpu`` learns on 2 cores in minutes, ``smoke`` runs in
# seconds. Everything else (vocabulary, pooling, positions) stays official; tasks change what they must.
CPU_SHAPE = dict(num_layers=2, emb_dim=64, qkv_dim=64, mlp_dim=128, num_heads=4, dropout=0.0, attn_dropout=0.0)
SMOKE_SHAPE = dict(num_layers=1, emb_dim=32, qkv_dim=32, mlp_dim=64, num_heads=4)


def sparse_attention_scale(encoder_length: int) -> dict[str, int]:
    """BigBird's block for a ``cpu`` or ``smoke`` sequence of ``encoder_length`` tokens, so that the sparse
    encoders run their own pattern there, as at full length, rather than full attention.

    BigBird: the official grid is 16 blocks of 64 per 1,024 tokens (Text, Image, Pathfinder); the block
    is that grid scaled to the length, ``length / 16`` rounded to a power of two, at most the official 64:
    12 to 23 blocks, always more than the 8 that the pattern needs (ListOps cpu: 101 tokens, 13 blocks of
    8, where blocks of 64 made 2 and fell back to dense attention). Reformer: ``n_buckets`` stays the
    official 10 over the length, so its buckets (``length / 10``) already scale with it."""
    return {"block_size": min(64, 1 << max(0, round(math.log2(encoder_length / 16))))}


def smoke_train(official: TrainConfig, batch_size: int = 8) -> TrainConfig:
    """The ``smoke`` loop of every task: 20 steps, evaluated and checkpointed twice."""
    return replace(official, batch_size=batch_size, steps=20, warmup=5, eval_every=10, checkpoint_every=10)


@dataclass(frozen=True)
class SmallPreset:
    """The ``cpu`` or ``smoke`` preset of a task: changes to each encoder's official model config, and
    its own training loop and data options."""

    model: Mapping[str, Any]
    train: TrainConfig
    data: DataOptions


@dataclass(frozen=True)
class Presets:
    """A task's three presets, each stated once in its module. ``models`` holds the official model
    config per encoder where the LRA release has one (as its config files say it; what an encoder's
    official code ignored, e.g. attention dropout, the application's ``make_spec`` corrects with the
    encoder's ``official_settings``); an encoder without gets the Transformer's. The small presets scale
    the sparse attentions to their length (:func:`sparse_attention_scale`)."""

    models: Mapping[str, ModelConfig]
    train: TrainConfig
    data: DataOptions
    cpu: SmallPreset
    smoke: SmallPreset

    def resolve(self, preset: Preset, model: str) -> tuple[ModelConfig, TrainConfig, DataOptions]:
        """The model, training and data config of ``preset`` for encoder ``model``."""
        official = self.models.get(model, self.models["transformer"])
        if preset == Preset.official:
            return official, self.train, self.data
        small: SmallPreset = getattr(self, Preset(preset).value)
        model_cfg = replace(official, **small.model)
        return replace(model_cfg, **sparse_attention_scale(model_cfg.encoder_length)), small.train, small.data


class Task:
    """Base class of the tasks. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    presets: ClassVar[Presets]
    dual: ClassVar[bool] = False  # two documents per example (Retrieval)
    generated: ClassVar[bool] = False  # can write its own data (ListOps, Pathfinder)
    sources: ClassVar[tuple[Source, ...]] = ()  # what `run_lra.py download` fetches for it (lra_dtn.download)
    tokenizer_version: ClassVar[int] = 1  # bump when tokenization changes: invalidates caches

    def spec(self, preset: Preset, model: str) -> tuple[ModelConfig, TrainConfig, DataOptions]:
        """The model, training and data config of ``preset`` for encoder ``model``."""
        return self.presets.resolve(preset, model)

    def prepare(self, data_dir: Path, options: DataOptions) -> list[Path]:
        """Make the task's files present under ``data_dir`` and return them; the commands call this
        before training, once per data setting. Generating tasks write what is missing (and say so);
        here, the files are only checked, and a :class:`DataError` names what is missing, where it
        comes from and the command that fetches it. Nothing is downloaded unasked: the release is
        8 GB, and a sweep lists a task without data as missing instead."""
        try:
            return self.source_files(Path(data_dir), options)
        except DataError as err:
            if not self.sources:
                raise
            raise DataError(f"{err}; {self.download_hint()}") from None

    def download_hint(self) -> str:
        """How to fetch the task's files, e.g. ``python run_lra.py download --tasks text (aclImdb_v1.tar.gz,
        84.13 MB)``."""
        archives = dict.fromkeys(source.archive for source in self.sources)
        sizes = ", ".join(f"{a.filename}, {'about ' if a.size is None else ''}{human(a.expected_size)}"
                          if a.expected_size else a.filename for a in archives)
        return f"`python run_lra.py download --tasks {self.name}` fetches it ({sizes})"

    def source_files(self, data_dir: Path, options: DataOptions) -> list[Path]:
        """The raw files the splits are read from; raises :class:`DataError` naming what is missing
        and where it comes from. Never writes anything (that is :meth:`prepare`)."""
        raise NotImplementedError

    def read(self, data_dir: Path, options: DataOptions) -> dict[str, Iterable[dict[str, Any]]]:
        """``{"train"|"val"|"test": examples}``, each ``{"input_ids", "label"[, "input_ids2"]}``."""
        raise NotImplementedError

    def generate(self, out_dir: Path, options: DataOptions, workers: int = 1) -> Path:
        """Write the task's data in the official layout into ``out_dir`` (generated tasks only)."""
        raise DataError(f"{self.name} data cannot be generated; see the README for where to get it")

    def describe(self, options: DataOptions, model: ModelConfig | None = None) -> str:
        """One line for the results table on what data ran (e.g. 'generated, lengths 50-200'), and
        anything about the model the table must show (e.g. which Retrieval head)."""
        return "official"

    def load(self, data_dir: Path, options: DataOptions, cache_dir: Path) -> dict[str, Any]:
        """Tokenized splits, from the cache when every parameter and source file is unchanged. Reads
        only: the files must be there (:meth:`prepare`)."""
        sources = self.source_files(Path(data_dir), options)
        params = {
            "task": self.name,
            "tokenizer": self.tokenizer_version,
            "options": options,
            "sources": file_fingerprint(sources),
        }
        return cached_splits(Path(cache_dir), self.name, params, lambda: self.read(Path(data_dir), options))


TASKS: Registry[type[Task]] = Registry("task")


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: registers the task in :data:`TASKS` under its ``name`` (written once, in the class)."""
    return TASKS.register(cls.name)(cls)


def generation_workers() -> int:
    """Processes a generating ``prepare`` uses: every core, up to 8."""
    return min(os.cpu_count() or 1, 8)


def tsv_records(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, record)`` of a TSV file split into records as the official reader does:
    ``tf.data``'s ``CsvDataset`` ends an unquoted field and its record at ``\\n`` or ``\\r`` (``\\r\\n``
    counting once; tensorflow/core/kernels/data/experimental/csv_dataset_op.cc, ``ParseUnquotedField``).
    Empty records are skipped; line numbers count ``\\n`` as an editor does. Bytes: each reader decodes."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            for record in line.rstrip(b"\n").split(b"\r"):
                if record:
                    yield lineno, record


def require(path: Path, what: str) -> Path:
    """``path`` if it exists, else a :class:`DataError` saying what was expected and from where."""
    if not path.exists():
        raise DataError(f"missing {path}: expected {what}")
    return path
