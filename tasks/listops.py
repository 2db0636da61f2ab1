"""ListOps (Nangia & Bowman 2018; LRA "Long ListOps"): reading, tokenizing and generating.

Files: ``<data-dir>/listops-1000/basic_{train,val,test}.tsv`` from the LRA release
(``lra_release/lra_release/listops-1000/``; ``run_lra.py download --tasks listops``), or generated here
by a port of the official generator (LRA ``lra_benchmarks/data/listops.py``, spec §4) when the folder is
missing.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

import numpy as np

from lra_dtn.config import ModelConfig, TrainConfig
from lra_dtn.data import DataError
from lra_dtn.download import release_folder
from tasks.base import (CPU_SHAPE, SMOKE_SHAPE, DataOptions, Presets, SmallPreset, Task, generation_workers,
                        register_task, smoke_train, tsv_records)

# Generator constants (LRA data/listops.py). [FIRST and [LAST exist there but are commented out.
OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VALUE_P = 0.25  # a node below max depth is an operator with probability 0.25

# A fixed vocabulary (spec §2.1/§12): the official one is built from a Python ``set`` and so changes
# with PYTHONHASHSEED (LRA issue #60); the ids here never do. 0 is padding, the last id is OOV.
VOCAB = ("[MIN", "[MAX", "[MED", "[SM", "X") + tuple(str(v) for v in range(10))
TOKEN_IDS = {token: i + 1 for i, token in enumerate(VOCAB)}
OOV_ID = len(VOCAB) + 1
VOCAB_SIZE = len(VOCAB) + 2  # 17, as the official TokenTextEncoder (15 tokens + OOV + pad)

Tree = Union[int, str, tuple]


@dataclass(frozen=True)
class ListOpsData(DataOptions):
    """Generator settings; the defaults are the official flags (LRA data/listops.py)."""

    num_train: int = 96_000
    num_val: int = 2_000
    num_test: int = 2_000
    min_length: int = 500  # strict bounds: kept trees have min_length < length < max_length
    max_length: int = 2_000
    max_depth: int = 10
    max_args: int = 10
    seed: int = 0  # generator seed (the official generator is unseeded)

    @property
    def folder(self) -> str:
        """``listops-1000`` (the release's name) for the official settings, else one per setting."""
        if replace(self, seed=0) == ListOpsData():
            return "listops-1000"
        return (f"listops-len{self.min_length}-{self.max_length}-depth{self.max_depth}-args{self.max_args}"
                f"-n{self.num_train}-{self.num_val}-{self.num_test}-seed{self.seed}")


# ---------------------------------------------------------------------------------------------
# Generator


class _TooLong(Exception):
    """Raised to abandon a tree as soon as it must exceed the length bound (it would be rejected)."""


def generate_tree(rng: random.Random, max_depth: int, max_args: int, budget: float = float("inf"),
                  depth: int = 1) -> tuple[Tree, int]:
    """One random tree and its length (operators + ``]`` + values), as the official
    ``generate_tree``: a left-nested binary tuple ``((((op, c1), c2), ...), cn), ']')``.

    ``budget`` only stops work early on trees that the length filter would reject anyway."""
    r = rng.random() if depth < max_depth else 1.0
    if r > VALUE_P:
        return rng.choice(range(10)), 1
    num_args = rng.randint(2, max_args)
    length = 2
    children = []
    for _ in range(num_args):
        child, child_length = generate_tree(rng, max_depth, max_args, budget - length, depth + 1)
        children.append(child)
        length += child_length
        if length >= budget:
            raise _TooLong
    tree: Tree = rng.choice(OPERATORS)
    for child in children:
        tree = (tree, child)
    return (tree, END), length


def to_string(tree: Tree) -> str:
    """The official serialisation, parentheses included: ``( ( ( [MAX 1 ) 2 ) ] )``."""
    if isinstance(tree, tuple):
        return f"( {to_string(tree[0])} {to_string(tree[1])} )"
    return str(tree)


def apply_operator(op: str, args: list[int]) -> int:
    """MIN, MAX, MED (``int(np.median)``: the even-count median truncates), SM (sum mod 10)."""
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[MED":
        return int(np.median(args))
    if op == "[SM":
        return sum(args) % 10
    raise ValueError(f"unknown operator {op!r}")


def evaluate(tree: Tree) -> int:
    """The value of a tree built by :func:`generate_tree`."""
    if not isinstance(tree, tuple):
        return int(tree)
    node, args = tree[0], []  # tree = (((op, c1), ...), ']')
    while isinstance(node, tuple):
        args.append(evaluate(node[1]))
        node = node[0]
    return apply_operator(node, args[::-1])


def evaluate_source(source: str) -> int:
    """The value of a serialised expression (file format), by a stack over its tokens."""
    stack: list[list[Any]] = []
    value = None
    for token in tokenize(source):
        if token in OPERATORS:
            stack.append([token])
        elif token == "X":
            op, *args = stack.pop()
            value = apply_operator(op, args)
            if stack:
                stack[-1].append(value)
        elif stack:
            stack[-1].append(int(token))
        else:
            value = int(token)
    return value


def _accepted_chunk(seed: int, chunk: int, tries: int, options: ListOpsData) -> list[tuple[str, int]]:
    """``(source, target)`` of the accepted trees among ``tries`` draws from stream ``(seed, chunk)``."""
    rng = random.Random(seed * 1_000_003 + chunk)
    accepted = []
    for _ in range(tries):
        try:
            tree, length = generate_tree(rng, options.max_depth, options.max_args, options.max_length)
        except _TooLong:
            continue
        if options.min_length < length < options.max_length:
            accepted.append((to_string(tree), evaluate(tree)))
    return accepted


def generate_examples(options: ListOpsData, workers: int = 1, tries_per_chunk: int = 2_000) -> list[tuple[str, int]]:
    """Distinct accepted ``(source, target)`` pairs, enough for all three splits.

    Draws come in seeded chunks that are merged in chunk order, so the result depends on the seed
    only, not on the number of worker processes. Duplicates are dropped as the official ``set``."""
    wanted = options.num_train + options.num_val + options.num_test
    seen: dict[str, int] = {}
    chunk = 0
    with ProcessPoolExecutor(workers) if workers > 1 else _InlineExecutor() as pool:
        while len(seen) < wanted:
            batch = range(chunk, chunk + max(workers, 1) * 2)
            for result in pool.map(_accepted_chunk, [options.seed] * len(batch), batch,
                                   [tries_per_chunk] * len(batch), [options] * len(batch)):
                for source, target in result:
                    seen.setdefault(source, target)
            chunk += len(batch)
    return list(seen.items())[:wanted]


class _InlineExecutor:
    """``ProcessPoolExecutor``'s ``map`` in this process (no start-up cost for small runs)."""

    def __enter__(self) -> "_InlineExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn, *iterables):
        return map(fn, *iterables)


def write_tsv(path: Path, rows: Iterable[tuple[str, int]]) -> None:
    """The official file format: header ``Source\\tTarget``, one tab-separated row per example."""
    with open(path, "w", newline="") as f:
        f.write("Source\tTarget\n")
        f.writelines(f"{source}\t{target}\n" for source, target in rows)


def generate(out_dir: Path, options: ListOpsData, workers: int = 1) -> Path:
    """Write ``basic_{train,val,test}.tsv`` into ``out_dir``; the folder appears only when complete."""
    out_dir = Path(out_dir)
    examples = generate_examples(options, workers)
    sizes = {"train": options.num_train, "val": options.num_val, "test": options.num_test}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    start = 0
    for split, size in sizes.items():
        write_tsv(tmp / f"basic_{split}.tsv", examples[start : start + size])
        start += size
    if out_dir.exists():  # an explicit `generate --out` into an existing folder replaces its files
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Reading and tokenizing


def tokenize(source: str) -> list[str]:
    """The official preprocessing: ``]`` -> ``X``, parentheses dropped, split on whitespace."""
    return source.translate({ord("]"): "X", ord("("): None, ord(")"): None}).split()


def encode(source: str) -> list[int]:
    """Token ids with the fixed vocabulary; no BOS/EOS/CLS is added (the CLS is in the model)."""
    return [TOKEN_IDS.get(token, OOV_ID) for token in tokenize(source)]


def read_tsv(path: Path, max_length: int) -> Iterator[dict[str, Any]]:
    """Examples of one official TSV, truncated to ``max_length`` tokens as the official pipeline.

    Records are split as the official reader splits them (:func:`tasks.base.tsv_records`). A malformed
    record (not UTF-8, wrong fields, a label other than 0-9) raises :class:`DataError` naming the file
    and the line number."""
    header = True
    for lineno, record in tsv_records(path):
        try:
            text = record.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}:{lineno}: not UTF-8 text ({err}): {record[:60]!r}") from None
        fields_ = text.split("\t")
        if header:
            if fields_ != ["Source", "Target"] or lineno != 1:
                raise DataError(f"{path}:1: expected the header 'Source<TAB>Target', found {text[:60]!r}")
            header = False
            continue
        label = fields_[1].strip() if len(fields_) == 2 else ""
        if len(label) != 1 or label not in "0123456789":
            raise DataError(f"{path}:{lineno}: expected 'expression<TAB>label 0-9', found {text[:60]!r}")
        ids = encode(fields_[0])
        if not ids:
            raise DataError(f"{path}:{lineno}: empty expression")
        yield {"input_ids": ids[:max_length], "label": int(label)}
    if header:
        raise DataError(f"{path}: empty file; expected the header 'Source<TAB>Target' and one example per line")


# ---------------------------------------------------------------------------------------------
# The task and its configs

# LRA listops/configs/base_listops_config.py at HEAD (spec §7.1); train.py passes only the base lr,
# so the schedule is the default constant*linear_warmup*rsqrt_decay with warmup 1000 (spec §6).
OFFICIAL_MODEL = ModelConfig(vocab_size=VOCAB_SIZE, num_classes=10, max_len=2000, num_layers=4, emb_dim=512,
                             qkv_dim=512, mlp_dim=1024, num_heads=8, dropout=0.1, attn_dropout=0.1,
                             pooling="cls", pos_emb="sinusoidal")
OFFICIAL_TRAIN = TrainConfig(batch_size=32, steps=5000, lr=0.05, schedule="rsqrt", warmup=1000,
                             weight_decay=0.1, eval_every=50, checkpoint_every=500)

# cpu: short generated expressions so a small model learns well above the 17% majority class on 2
# cores in minutes. smoke: seconds, for CI.
CPU_DATA = ListOpsData(num_train=20_000, num_val=500, num_test=1_000, min_length=20, max_length=100, max_depth=6)
SMOKE_DATA = ListOpsData(num_train=256, num_val=64, num_test=64, min_length=10, max_length=40, max_depth=4)
PRESETS = Presets(
    models={"transformer": OFFICIAL_MODEL}, train=OFFICIAL_TRAIN, data=ListOpsData(),
    cpu=SmallPreset(model=dict(CPU_SHAPE, max_len=CPU_DATA.max_length),
                    train=replace(OFFICIAL_TRAIN, batch_size=32, steps=2000, lr=0.05, warmup=200, eval_every=200,
                                  checkpoint_every=200),
                    data=CPU_DATA),
    smoke=SmallPreset(model=dict(SMOKE_SHAPE, max_len=SMOKE_DATA.max_length),
                      train=smoke_train(OFFICIAL_TRAIN, batch_size=16), data=SMOKE_DATA))


@register_task
class ListOps(Task):
    name = "listops"
    presets = PRESETS
    generated = True
    sources = (release_folder("listops-1000"),)

    def generate(self, out_dir: Path, options: ListOpsData, workers: int = 1) -> Path:
        return generate(out_dir, options, workers)

    def folder(self, data_dir: Path, options: ListOpsData) -> Path:
        return Path(data_dir) / options.folder

    def prepare(self, data_dir: Path, options: ListOpsData) -> list[Path]:
        """Generates the folder when it is missing (the default on a fresh machine)."""
        folder = self.folder(data_dir, options)
        if not folder.exists():
            fetch = (f" (`python run_lra.py download --tasks {self.name}` fetches the release's instead)"
                     if any(source.folder == options.folder for source in self.sources) else "")
            print(f"[listops] {folder} not found: generating {options.num_train}/{options.num_val}/"
                  f"{options.num_test} examples there (seed {options.seed}); this is done once{fetch}.", flush=True)
            generate(folder, options, workers=generation_workers())
        return self.source_files(data_dir, options)

    def source_files(self, data_dir: Path, options: ListOpsData) -> list[Path]:
        folder = self.folder(data_dir, options)
        files = [folder / f"basic_{split}.tsv" for split in ("train", "val", "test")]
        if not folder.exists():
            raise DataError(f"missing {folder}: expected the LRA release's listops-1000/ files or generated ones "
                            "(the train and sweep commands generate it)")
        for f in files:
            if not f.exists():
                raise DataError(f"missing {f}: expected the LRA release file listops-1000/{f.name} "
                                f"(or delete {folder} to regenerate it)")
        return files

    def read(self, data_dir: Path, options: ListOpsData) -> dict[str, Iterable[dict[str, Any]]]:
        folder = self.folder(data_dir, options)
        max_len = 2000 if options.folder == "listops-1000" else options.max_length
        return {split: read_tsv(folder / f"basic_{split}.tsv", max_len) for split in ("train", "val", "test")}

    def describe(self, options: ListOpsData, model: ModelConfig | None = None) -> str:
        if options.folder == "listops-1000":
            return "listops-1000 (official files or generated with the official settings)"
        return (f"generated: lengths {options.min_length + 1}-{options.max_length - 1}, depth <= {options.max_depth}, "
                f"{options.num_train}/{options.num_val}/{options.num_test}")

