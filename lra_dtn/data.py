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


def file_fingerprint(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of each source file: part of the cache key, so edited data is re-read."""
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(paths)]


def cache_key(params: dict[str, Any]) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, **params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _features(columns: Iterable[str]):
    import datasets

    feats = {c: datasets.Sequence(datasets.Value("int16")) for c in columns if c.startswith("input_ids")}
    feats.update(label=datasets.Value("int64"), length=datasets.Value("int32"))
    return datasets.Features(feats)


def _compact(examples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Token lists as int16 arrays (2 bytes a token, not a Python int each) plus the length."""
    for ex in examples:
        ids = {k: np.asarray(v, dtype=np.int16) for k, v in ex.items() if k.startswith("input_ids")}
        yield {**ex, **ids, "length": len(ids["input_ids"])}


def _stream_to_arrow(examples: Iterable[dict[str, Any]], workdir: Path, what: str) -> Any:
    """Write examples to Arrow as they come (never the whole split in memory).

    ``datasets`` wraps errors raised inside the generator; a :class:`DataError` (file and line of a
    malformed row) is re-raised as itself so the user sees the message, not the wrapper."""
    import datasets

    examples = iter(_compact(examples))
    first = next(examples, None)
    if first is None:
        raise DataError(f"{what}: the split is empty")
    columns = [c for c in first if c.startswith("input_ids")]

    def rows() -> Iterator[dict[str, Any]]:
        yield first
        yield from examples

    try:
        return datasets.Dataset.from_generator(rows, features=_features(columns), cache_dir=str(workdir),
                                               fingerprint=hashlib.sha256(f"{workdir}{what}".encode()).hexdigest())
    except datasets.exceptions.DatasetGenerationError as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__
        raise (cause or err) from None


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
        with tempfile.TemporaryDirectory(dir=cache_root, prefix=f".{name}-building-") as tmp:
            splits = {split: _stream_to_arrow(examples, Path(tmp) / "arrow", f"{name}/{split}")
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
