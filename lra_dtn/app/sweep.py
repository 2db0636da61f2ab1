"""The LN-vs-DTN grid as one job: tasks x models x norms x seeds, resumable, with the table after every run.

``run_lra.py sweep --tasks all --models all --norms ln,dtn --seeds 0,1,2 --preset cpu --out results/``

* Every run goes through :func:`lra_dtn.app.engine.train` with ``resume=True``: a finished run (its
  ``result.json`` exists) is skipped, a run cut mid-training continues from its checkpoint. So the
  same command, run again after a kill at any point, finishes the grid; the table is rebuilt from the
  run JSONs, so nothing in it is lost or counted twice.
* Seeds are the outer loop: a sweep stopped half-way leaves every configuration with some seeds
  rather than some configurations with all of them.
* A task whose data is missing (and cannot be generated) is checked once, before any training, and
  recorded as ``OUT/missing/<task>-<preset>[-<variant>].json`` with the reason and the models, norms
  and seeds that wanted it (merged over sweeps); the table lists it as missing. The marker goes away
  once the data is there.
* A run that raises is recorded as ``OUT/failed/<run_id>.json`` and the sweep goes on with the next
  (on one process; under ``torchrun`` the ranks must stay in step, so it stops). The exit status is
  1 when a run failed.
* Under ``torchrun`` every rank walks the same grid; rank 0 alone checks the data and writes files.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from lra_dtn import distributed
from lra_dtn.app import artifacts, engine, tables
from lra_dtn.app.checkpoint import CHECKPOINT_FILE, run_dir
from lra_dtn.app.options import add_common, run_spec
from lra_dtn.config import RunSpec
from lra_dtn.data import DataError
from lra_dtn.norms import NORMS
from lra_dtn.registry import Registry
from models import MODELS
from tasks import TASKS

DEFAULT_NORMS = "ln,dtn"


def parse_names(text: str, registry: Registry, what: str) -> list[str]:
    """``"all"`` or a comma list, checked against the registry; order kept, duplicates dropped."""
    if text.strip() == "all":
        return registry.names()
    names = list(dict.fromkeys(n.strip() for n in text.split(",")))
    if "" in names:
        raise ValueError(f"--{what} {text!r}: an empty name; give a comma list such as "
                         f"{','.join(registry.names()[:2])}, or all")
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"--{what}: unknown {registry.kind} {', '.join(map(repr, unknown))}; "
                         f"choose from: {', '.join(registry.names())} (or all)")
    return names


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-4"`` (inclusive) or a mix: ``"0-2,7"``."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        first, sep, last = part.partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise ValueError(f"--seeds {text!r}: expected non-negative integers or ranges such as 0,1,2 or 0-4, "
                             f"found {part!r}")
        if sep and int(last) < int(first):
            raise ValueError(f"--seeds {text!r}: the range {part!r} runs backwards; write {last}-{first}")
        seeds += list(range(int(first), int(last) + 1)) if sep else [int(first)]
    return list(dict.fromkeys(seeds))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default="all",
                        help=f"comma list or all (default: %(default)s); tasks: {', '.join(TASKS.names())}")
    parser.add_argument("--models", default="all",
                        help=f"comma list or all (default: %(default)s); encoders: {', '.join(MODELS.names())}")
    parser.add_argument("--norms", default=DEFAULT_NORMS,
                        help=f"comma list or all; each norm other than ln gets a paired difference to ln "
                             f"(default: %(default)s); norms: {', '.join(NORMS.names())}")
    parser.add_argument("--seeds", default="0,1,2", help="comma list or ranges, e.g. 0,1,2 or 0-4 "
                                                         "(default: %(default)s)")
    add_common(parser)


def plan(args: argparse.Namespace) -> list[RunSpec]:
    """Every run of the grid, seeds outermost; a bad name or setting fails here, before any training."""
    tasks = parse_names(args.tasks, TASKS, "tasks")
    models = parse_names(args.models, MODELS, "models")
    norms = parse_names(args.norms, NORMS, "norms")
    seeds = parse_seeds(args.seeds)
    return [run_spec(args, task, model, norm, seed)
            for seed in seeds for task in tasks for model in models for norm in norms]


def finished(out: Path, spec: RunSpec) -> bool:
    """Whether the run's result exists; a damaged one raises (naming it) before anything is trained."""
    path = Path(out) / "runs" / spec.run_id / artifacts.RESULT_FILE
    return path.exists() and bool(artifacts.read_result(path))


def prepare_data(specs: list[RunSpec], data_dir: Path) -> dict[str, str]:
    """Prepares the data of every task with unfinished runs (:meth:`tasks.base.Task.prepare`: generated
    tasks generate what is missing); ``{task: reason}`` for the tasks whose files are still missing.

    Each distinct data setting of a task is checked once; only tasks with unfinished runs are asked."""
    missing: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    for spec in specs:
        key = (spec.task, repr(spec.data))
        if spec.task in missing or key in seen:
            continue
        seen.add(key)
        try:
            TASKS.get(spec.task)().prepare(Path(data_dir), spec.data)
        except DataError as err:
            missing[spec.task] = str(err)
    return missing


def write_missing(out: Path, task: str, specs: list[RunSpec], reason: str) -> None:
    """The task's markers, one per settings variant, merged with what earlier sweeps recorded there
    (another sweep of other models or seeds of the task must not drop theirs from the table)."""
    for variant in dict.fromkeys(s.variant for s in specs if s.task == task):
        mine = [s for s in specs if s.task == task and s.variant == variant]
        first = mine[0]
        path = artifacts.missing_marker(out, task, first.preset, variant)
        old = artifacts.load_marker(path, artifacts.MISSING_DIR) if path.exists() else {}
        artifacts.write_json(path, {
            "task": task, "preset": first.preset, "variant": variant, "reason": reason,
            "models": sorted({s.model_name for s in mine} | set(old.get("models", []))),
            "norms": sorted({s.norm for s in mine} | set(old.get("norms", []))),
            "seeds": sorted({s.seed for s in mine} | set(old.get("seeds", []))),
            "data": TASKS.get(task)().describe(first.data, first.model)})


def write_failed(out: Path, spec: RunSpec, err: BaseException) -> None:
    artifacts.write_json(artifacts.failed_marker(out, spec.run_id), {
        "run_id": spec.run_id, "task": spec.task, "model": spec.model_name, "norm": spec.norm,
        "preset": spec.preset, "variant": spec.variant, "seed": spec.seed,
        "error": f"{type(err).__name__}: {err}",
        "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__))[-4000:]})


def main(args: argparse.Namespace) -> None:
    specs = plan(args)
    ctx = distributed.init(args.device)
    out = Path(args.out)

    def say(message: str) -> None:
        if ctx.is_main:
            print(f"[sweep] {message}", flush=True)

    pending = [s for s in specs if not finished(out, s)]
    # Rank 0 prepares the data once; the other ranks take its verdict (same files).
    missing = distributed.broadcast(ctx, prepare_data(pending, args.data_dir) if ctx.is_main else None)
    if ctx.is_main:
        for task in dict.fromkeys(s.task for s in specs):
            if task in missing:
                write_missing(out, task, pending, missing[task])
                say(f"{task}: data missing, its runs are skipped and listed in the table: {missing[task]}")
            else:  # the data is there now, or no run of the task needs it any more
                for variant in {s.variant for s in specs if s.task == task}:
                    artifacts.missing_marker(out, task, args.preset, variant).unlink(missing_ok=True)

    todo = [s for s in pending if s.task not in missing]
    say(f"{len(specs)} runs in the grid: {len(specs) - len(pending)} already finished, {len(todo)} to go"
        + (f", {len(pending) - len(todo)} without data" if len(pending) > len(todo) else ""))
    failures: list[str] = []
    for i, spec in enumerate(todo, start=1):
        if spec.task in missing:  # its data went missing while loading an earlier run
            continue
        ckpt = run_dir(out, spec) / CHECKPOINT_FILE
        say(f"[{i}/{len(todo)}] {spec.run_id}" + (" (resuming from its checkpoint)" if ckpt.exists() else ""))
        try:
            result = engine.train(spec, out, args.data_dir, args.cache_dir, resume=True, device=args.device,
                                  progress=args.progress, memory_budget_gb=args.memory_budget)
        except DataError as err:
            if ctx.group:
                raise
            missing[spec.task] = str(err)
            write_missing(out, spec.task, todo, str(err))
            say(f"{spec.task}: data error, its remaining runs are skipped: {err}")
            continue
        except Exception as err:  # noqa: BLE001 (one run's crash must not end a day-long grid)
            if ctx.group:
                raise  # the other ranks are inside collectives: they cannot go on without this one
            failures.append(spec.run_id)
            write_failed(out, spec, err)
            say(f"{spec.run_id} FAILED ({type(err).__name__}: {err}); recorded in "
                f"{artifacts.failed_marker(out, spec.run_id)}, going on")
            continue
        if ctx.is_main:
            artifacts.failed_marker(out, spec.run_id).unlink(missing_ok=True)
            tables.update_tables(out)  # a sweep cut later still leaves the table of every finished run
        say(f"{spec.run_id}: test accuracy {result['test_acc']:.4f}, {result['sec_per_step'] * 1000:.1f} ms/step")

    if ctx.is_main:
        tables.update_tables(out, figure=True)
        say(f"table: {out / 'results.md'} and {out / 'results.csv'}"
            + (f"; figure: {out / 'dtn_gates.png'}" if (out / "dtn_gates.png").exists() else ""))
    distributed.barrier(ctx)
    distributed.shutdown(ctx)
    if missing:
        say(f"missing data (listed in the table): {', '.join(sorted(missing))}")
    if failures:
        sys.exit(f"[sweep] {len(failures)} run(s) failed: {', '.join(failures)} (see {out / artifacts.FAILED_DIR}/)")
