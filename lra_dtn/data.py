"""From tokenized examples to batches: the Arrow cache, the seeded sampler and the collator.

Data flows one way: a task's reader yields ``{"input_ids": [...], "label": int}`` per example (plus
``input_ids2`` for two-document tasks); :func:`cached_splits` writes them once into an Arrow cache
(Hugging Face ``datasets``) keyed by every parameter that shaped them; the trainer draws index sets
with :func:`train_indices` and turns them into a padded :class:`Batch` with :func:`collate`.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from lra_dtn.workdirs import owned_prefix, remove_abandoned

CACHE_FORMAT = 1  # bump when the cached layout changes, so no stale cache is ever trusted


class DataError(RuntimeError):
    """Missing or malformed data, with a message that says which file and what to do."""


@dataclass
class Batch:
    """A padded batch. ``mask`` is true for real tokens; ``ids2``/``mask2`` only for two towers."""

    ids: Tensor
    mask: Tensor
    labels: Tensor
    ids2: Tensor | None = None
    mask2: Tensor | None = None

    def inputs(self) -> tuple[Tensor, ...]:
        """Positional arguments of the model's ``forward``."""
        return (self.ids, self.mask) if self.ids2 is None else (self.ids, self.mask, self.ids2, self.mask2)

    def to(self, device: torch.device | str) -> "Batch":
        return replace(self, **{k: v.to(device, non_blocking=True) for k, v in vars(self).items() if v is not None})

    def __len__(self) -> int:
        return self.labels.shape[0]


#: Up to this many source files the cache key lists each; beyond, their count and a digest of the list.
FINGERPRINT_LIST = 100


def file_fingerprint(paths: Iterable[Path]) -> list[tuple[str, int, int]] | dict[str, Any]:
    """(path, size, mtime) of each source file: part of the cache key, so edited data is re-read. For
    many files (IMDB's 50,000 reviews, Pathfinder's 200,000 PNGs) the same triples go into a digest,
    so the key and the cache's ``params.json`` stay small; an edit to any one file still changes it."""
    entries = []
    for path in sorted(paths):
        stat = os.stat(path)
        entries.append((str(path), stat.st_size, stat.st_mtime_ns))
    if len(entries) <= FINGERPRINT_LIST:
        return entries
    digest = hashlib.sha256(json.dumps(entries).encode()).hexdigest()
    return {"files": len(entries), "first": entries[0][0], "last": entries[-1][0], "sha256": digest}


def cache_key(params: dict[str, Any]) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, **params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _features(columns: Iterable[str]):
    import datasets

    feats = {c: datasets.Sequence(datasets.Value("int16")) for c in columns if c.startswith("input_ids")}
    feats.update(label=datasets.Value("int64"), length=datasets.Value("int32"))
    return datasets.Features(feats)


def _compact(examples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Token lists as int16 arrays (2 bytes a token, not a Python int each) plus the length: of the
    longest document, for two-document tasks (what the memory probe and the eval order need)."""
    for ex in examples:
        ids = {k: np.asarray(v, dtype=np.int16) for k, v in ex.items() if k.startswith("input_ids")}
        yield {**ex, **ids, "length": max(len(v) for v in ids.values())}


def _stream_to_arrow(examples: Iterable[dict[str, Any]], workdir: Path, what: str, sources: str) -> Any:
    """Write examples to Arrow as they come (never the whole split in memory).

    ``datasets`` wraps errors raised inside the generator; a :class:`DataError` (file and line of a
    malformed row) is re-raised as itself so the user sees the message, not the wrapper, and any other
    error becomes one naming the split and its source files."""
    import datasets

    examples = iter(_compact(examples))
    try:
        first = next(examples, None)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 (a reader bug or an unforeseen format problem: say where)
        raise DataError(f"{what}: reading {sources} failed ({type(err).__name__}: {err})") from err
    if first is None:
        raise DataError(f"{what}: no examples in {sources}")
    columns = [c for c in first if c.startswith("input_ids")]

    def rows() -> Iterator[dict[str, Any]]:
        yield first
        yield from examples

    try:
        return datasets.Dataset.from_generator(rows, features=_features(columns), cache_dir=str(workdir),
                                               fingerprint=hashlib.sha256(f"{workdir}{what}".encode()).hexdigest())
    except datasets.exceptions.DatasetGenerationError as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, DataError) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, DataError):
            raise cause from None
        raise DataError(f"{what}: reading {sources} failed ({type(cause or err).__name__}: {cause or err})") from err


def describe_sources(fingerprint: list | dict) -> str:
    """The source files of a cache key, for messages: a few names, or the count and first/last."""
    if isinstance(fingerprint, dict):
        return f"{fingerprint['files']:,} files ({fingerprint['first']} ... {fingerprint['last']})"
    names = [entry[0] for entry in fingerprint]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "") if names else "no files"


def cached_splits(
    cache_root: Path,
    name: str,
    params: dict[str, Any],
    build: Callable[[], dict[str, Iterable[dict[str, Any]]]],
) -> dict[str, Any]:
    """Tokenized splits from the cache, building them with ``build()`` on a miss.

    The cache folder is named by a hash of ``params`` (which must include every preprocessing
    parameter and the source files' fingerprints) and appears only once complete: it is written
    under a temporary name and renamed, so a crash or a malformed file leaves nothing a later run
    would trust."""
    import datasets

    datasets.disable_progress_bars()
    target = Path(cache_root) / f"{name}-{cache_key(params)}"
    if not target.exists():
        Path(cache_root).mkdir(parents=True, exist_ok=True)
        remove_abandoned(cache_root, f".{name}-building-")
        sources = describe_sources(params.get("sources", []))
        with tempfile.TemporaryDirectory(dir=cache_root, prefix=owned_prefix(f".{name}-building-")) as tmp:
            splits = {split: _stream_to_arrow(examples, Path(tmp) / "arrow", f"{name}/{split}", sources)
                      for split, examples in build().items()}
            datasets.DatasetDict(splits).save_to_disk(Path(tmp) / "data")
            (Path(tmp) / "data" / "params.json").write_text(json.dumps(params, indent=1, default=str))
            try:
                os.replace(Path(tmp) / "data", target)
            except OSError:  # another process finished the same cache first
                if not target.exists():
                    raise
    loaded = datasets.load_from_disk(str(target))
    return {split: loaded[split].with_format("numpy") for split in loaded}


def train_indices(step: int, num_examples: int, batch_size: int, seed: int) -> np.ndarray:
    """Example indices of training step ``step``: a pure function of the step, so resuming is exact.

    Each epoch is a fresh seeded permutation; its last partial batch is dropped (every example is
    still seen, in other epochs)."""
    if num_examples < batch_size:
        raise DataError(f"the training split has {num_examples} examples, fewer than the batch size {batch_size}")
    per_epoch = num_examples // batch_size
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return order[offset * batch_size : (offset + 1) * batch_size]


def eval_order(lengths: np.ndarray) -> np.ndarray:
    """Evaluation visits examples sorted by length so batches carry little padding (same accuracy)."""
    return np.argsort(lengths, kind="stable")


def _pad(seqs: list[np.ndarray], mask_zero_tokens: bool) -> tuple[Tensor, Tensor]:
    lengths = [len(s) for s in seqs]
    ids = np.zeros((len(seqs), max(max(lengths), 1)), dtype=np.int64)
    for row, seq in zip(ids, seqs):
        row[: len(seq)] = seq
    ids_t = torch.from_numpy(ids)
    mask = torch.arange(ids.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    if mask_zero_tokens:  # the official image-task quirk: pixel value 0 counts as padding
        mask &= ids_t != 0
    return ids_t, mask


def collate(dataset: Any, indices: np.ndarray, mask_zero_tokens: bool = False) -> Batch:
    """Gather ``indices`` from a tokenized split and pad to the longest sequence of the batch.

    Padding to the batch's longest (not to the task's max length) is exact because every encoder
    and norm honours the mask, and it roughly halves the work on ListOps."""
    rows = dataset[np.asarray(indices)]
    ids, mask = _pad(list(rows["input_ids"]), mask_zero_tokens)
    labels = torch.as_tensor(np.asarray(rows["label"]), dtype=torch.long)
    if "input_ids2" not in rows:
        return Batch(ids, mask, labels)
    ids2, mask2 = _pad(list(rows["input_ids2"]), mask_zero_tokens)
    return Batch(ids, mask, labels, ids2, mask2)
