"""Command line: ``train`` (the default), ``generate``, ``download``, ``table`` and ``sweep``.

``run_lra.py --task listops --model bigbird --norm dtn`` trains one run;
``run_lra.py generate listops --out DIR`` writes a generated data set in the official layout;
``run_lra.py download --tasks text,retrieval`` fetches and unpacks the real data of those tasks;
``run_lra.py table --out DIR`` rebuilds the results table from the run JSONs under DIR.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lra_dtn.app import engine, sweep
from lra_dtn.app.artifacts import RESULT_FILE
from lra_dtn.app.checkpoint import RunExistsError, run_dir
from lra_dtn.app.options import add_common, folder_arg, non_negative_int, positive_int, run_spec
from lra_dtn.app.specs import apply_settings
from lra_dtn.app.tables import update_tables
from lra_dtn.config import Preset
from lra_dtn.data import DataError
from lra_dtn.download import ARCHIVES, DownloadError, download
from lra_dtn.norms import NORMS
from models import MODELS
from tasks import TASKS

SUBCOMMANDS = ("train", "generate", "download", "table", "sweep")
INTERRUPTED = {  # what Ctrl-C leaves behind, per subcommand
    "train": "the last checkpoint is kept; the same command with --resume goes on from it",
    "sweep": "finished runs and the last checkpoint are kept; the same command goes on from there",
    "generate": "nothing was written (the data folder appears only once complete)",
    "download": "a partial download is kept in DATA_DIR/.downloads and goes on from there with the same command; "
                "no task folder was half-written",
    "table": "the previous tables are intact (they are replaced only once complete)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_lra.py", description="Long-Range Arena with pluggable normalizers (LayerNorm vs DTN).",
        epilog="Subcommands: train (default), generate, download, table, sweep. `run_lra.py SUBCOMMAND --help` for "
               "each.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train and evaluate one run")
    train.add_argument("--task", required=True, choices=TASKS.names(), help="LRA task")
    train.add_argument("--model", required=True, choices=MODELS.names(), help="encoder")
    train.add_argument("--norm", default="ln", choices=NORMS.names(), help="normalizer in every norm slot")
    train.add_argument("--seed", type=non_negative_int, default=0, help="seed of init, data order and dropout")
    again = train.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run from its last checkpoint in --out (a finished run is reported)")
    again.add_argument("--overwrite", action="store_true", help="restart a run that already has files in --out")
    add_common(train)

    gen = sub.add_parser("generate", help="generate a task's data in the official file layout")
    gen.add_argument("task", choices=[n for n in TASKS.names() if TASKS.get(n).generated])
    gen.add_argument("--out", type=folder_arg, required=True, help="folder to write")
    gen.add_argument("--preset", default=Preset.official.value, choices=[p.value for p in Preset],
                     help="whose data settings to generate (default: %(default)s)")
    gen.add_argument("--seed", type=non_negative_int, default=None, help="generator seed (default: the preset's)")
    gen.add_argument("--set", dest="settings", action="append", default=[], metavar="NAME=VALUE",
                     help="change a data setting, e.g. --set num_train=1000")
    gen.add_argument("--workers", type=positive_int, default=2, help="processes (default: %(default)s)")

    fetch = sub.add_parser("download", help="fetch and unpack the real data of the chosen tasks (resumable, verified)")
    fetch.add_argument("--tasks", default="all",
                       help=f"comma list or all (default: %(default)s); tasks: {', '.join(TASKS.names())}")
    fetch.add_argument("--data-dir", type=folder_arg, default=Path("data"),
                       help="where the task folders go; archives are kept in DATA_DIR/.downloads (default: %(default)s)")
    fetch.add_argument("--force", action="store_true", help="replace task folders that already exist")
    fetch.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars (for logs)")
    fetch.add_argument("--url-base", default=None, metavar="URL",
                       help="read every archive from URL/<file name>: a mirror, or a local folder holding them")
    fetch.add_argument("--url", dest="urls", type=archive_url_arg, action="append", default=[], metavar="ARCHIVE=URL",
                       help=f"one archive's source ({', '.join(ARCHIVES)}): http(s)://, file:// or a local path, "
                            "read in place (repeatable)")

    table = sub.add_parser("table", help="rebuild results.csv / results.md from the run JSONs under --out")
    table.add_argument("--out", type=folder_arg, default=Path("results"), help="the sweep's or train's --out")

    sweep.add_arguments(sub.add_parser("sweep", help="the LN-vs-DTN grid: tasks x models x norms x seeds"))
    return parser


def cmd_train(args: argparse.Namespace) -> None:
    spec = run_spec(args, args.task, args.model, args.norm, args.seed)
    finished = args.resume and (run_dir(args.out, spec) / RESULT_FILE).exists()
    if int(os.environ.get("RANK", "0")) == 0 and not finished:  # ranks > 0 wait for rank 0 inside train
        TASKS.get(spec.task)().prepare(args.data_dir, spec.data)
    result = engine.train(spec, args.out, args.data_dir, args.cache_dir, resume=args.resume, overwrite=args.overwrite,
                   device=args.device, progress=args.progress, memory_budget_gb=args.memory_budget)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank returns the result; one reports it
        update_tables(args.out)
        print(f"{result['run_id']}: test accuracy {result['test_acc']:.4f} (val {result['val_acc']:.4f}), "
              f"{result['sec_per_step'] * 1000:.1f} ms/step; table: {args.out / 'results.md'}")


def cmd_generate(args: argparse.Namespace) -> None:
    task = TASKS.get(args.task)()
    _, _, options = task.spec(Preset(args.preset), "transformer")
    malformed = [s for s in args.settings if "=" not in s]
    if malformed:
        raise ValueError(f"--set {malformed[0]!r}: expected NAME=VALUE, e.g. --set num_train=1000")
    settings = dict(s.split("=", 1) for s in args.settings)
    if args.seed is not None:
        settings["seed"] = str(args.seed)
    options = apply_settings(options, settings, "data")
    folder = task.generate(args.out, options, workers=args.workers)
    print(f"wrote {folder} ({task.describe(options)})")


def archive_url_arg(text: str) -> tuple[str, str]:
    """``--url ARCHIVE=URL``: the archive's name must be one of the catalogue's."""
    name, _, url = text.partition("=")
    if name not in ARCHIVES or not url:
        raise argparse.ArgumentTypeError(f"expected ARCHIVE=URL with ARCHIVE one of {', '.join(ARCHIVES)}, got {text!r}")
    return name, url


def cmd_download(args: argparse.Namespace) -> None:
    names = sweep.parse_names(args.tasks, TASKS, "tasks")
    written = download({name: TASKS.get(name).sources for name in names}, args.data_dir, force=args.force,
                       progress=args.progress, url_base=args.url_base, urls=dict(args.urls))
    if written:
        print(f"done: {', '.join(folder.name for folder in written)} in {args.data_dir}")


def cmd_table(args: argparse.Namespace) -> None:
    if not args.out.is_dir():
        raise ValueError(f"--out {args.out}: no such folder (pass the --out your runs were written to)")
    update_tables(args.out, figure=True)
    figure = args.out / "dtn_gates.png"
    print(f"wrote {args.out / 'results.csv'} and {args.out / 'results.md'}"
          + (f" (DTN figure: {figure})" if figure.exists() else ""))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["train", *argv]  # `run_lra.py --task ...` means `run_lra.py train --task ...`
    args = build_parser().parse_args(argv)
    handler = {"train": cmd_train, "sweep": sweep.main, "generate": cmd_generate, "download": cmd_download,
               "table": cmd_table}[args.command]
    try:
        handler(args)
    except (DataError, DownloadError, RunExistsError, ValueError) as err:  # usage and data errors: the message says it all
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        print(f"\ninterrupted: {INTERRUPTED[args.command]}", file=sys.stderr)
        sys.exit(130)
