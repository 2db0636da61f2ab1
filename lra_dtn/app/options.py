"""The options ``train`` and ``sweep`` share, and the argument types that check them as they are parsed."""
from __future__ import annotations

import argparse
from pathlib import Path

from lra_dtn.app.specs import make_spec
from lra_dtn.config import PRECISIONS, Preset, RunSpec


def add_common(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``train`` and ``sweep``."""
    parser.add_argument("--preset", default=Preset.cpu.value, choices=[p.value for p in Preset],
                        help="official: the LRA config of the task; cpu: learns on 2 CPU cores in minutes "
                             "(smaller model, shorter generated data where noted); smoke: seconds, for CI "
                             "(default: %(default)s)")
    parser.add_argument("--data-dir", type=folder_arg, default=Path("data"),
                        help="folder holding the LRA files (see README); generated tasks write there "
                             "(default: %(default)s)")
    parser.add_argument("--cache-dir", type=folder_arg, default=None,
                        help="tokenized-data cache (default: DATA_DIR/.lra_dtn_cache)")
    parser.add_argument("--out", type=folder_arg, default=Path("results"),
                        help="output folder: runs/<run>/ (checkpoint, result.json), tb/ (TensorBoard), "
                             "results.csv and results.md (default: %(default)s)")
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="training steps (replaces the preset's; the schedule follows)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="global batch size, split over processes and --grad-accum")
    parser.add_argument("--grad-accum", type=grad_accum_arg, default=None, metavar="N|auto",
                        help="split each batch into N sequential micro-batches (same gradient, less memory); "
                             "auto: the fewest that fit --memory-budget, probed on the longest examples")
    parser.add_argument("--memory-budget", type=positive_float, default=None, metavar="GIB",
                        help="memory a step may take with --grad-accum auto (default: 90%% of the free memory)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="bf16 autocast (GPUs); DTN statistics stay in float32 (default: fp32)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (under torchrun: one GPU per process)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="SECTION.NAME=VALUE",
                        help="change any config field, e.g. --set model.num_layers=2 --set train.lr=1e-3 "
                             "--set data.max_length=4000 (repeatable); the run id gets a hash of the change")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def folder_arg(text: str) -> Path:
    """A folder to read or write: it may not exist yet, but it may not be a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return path


def count_arg(text: str, least: int) -> int:
    if not text.isdigit() or int(text) < least:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}")
    return int(text)


def positive_int(text: str) -> int:
    return count_arg(text, 1)


def non_negative_int(text: str) -> int:
    return count_arg(text, 0)


def grad_accum_arg(text: str) -> int:
    """``--grad-accum``: a positive count, or ``auto`` (stored as 0 in the config)."""
    return 0 if text == "auto" else positive_int(text)


def positive_float(text: str) -> float:
    """``--memory-budget``: GiB, more than zero (0 would silently mean "the default")."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of GiB, got {text!r}")
    return value


def run_spec(args: argparse.Namespace, task: str, model: str, norm: str, seed: int) -> RunSpec:
    """The run of (task, model, norm, seed) as the options ask: the preset, the shortcut flags
    (``--max-steps``, ``--batch-size``, ``--grad-accum``, ``--precision``) as typed train changes, then
    the ``--set`` entries on top (a later ``--set`` of the same field wins)."""
    flags = {"steps": args.max_steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
             "precision": args.precision}
    spec = make_spec(task, model, norm, args.preset, seed, args.settings,
                     train_changes={name: value for name, value in flags.items() if value is not None})
    if args.memory_budget is not None and spec.train.grad_accum != 0:
        raise ValueError("--memory-budget applies only with --grad-accum auto (train.grad_accum=0)")
    return spec
