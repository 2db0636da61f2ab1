"""Run artifacts on disk: one JSON per run and the sweep's markers, written atomically, read with checks.

``OUT/runs/<run_id>/result.json`` (one per finished run), ``OUT/missing/<task>-<preset>[-<variant>].json``
(a task whose data is missing, with the reason) and ``OUT/failed/<run_id>.json`` (a run that raised).
Every file is written to a temporary name in the same folder and renamed into place, so a crash never
leaves a half-written JSON, CSV or Markdown table behind.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lra_dtn.workdirs import write_atomic

RESULT_FILE = "result.json"
MISSING_DIR = "missing"
FAILED_DIR = "failed"


class RunFileError(ValueError):
    """A file under ``OUT`` that should be one of ours (run result, marker, checkpoint) but is not:
    damaged or foreign. The message names the file and what to delete."""


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


# The keys the tables need from each kind of JSON.
RESULT_KEYS = ("run_id", "task", "model", "norm", "preset", "seed", "test_acc")
MISSING_KEYS = ("task", "preset", "reason")
FAILED_KEYS = ("run_id", "task", "model", "norm", "preset", "seed")


def read_json(path: Path, keys: tuple[str, ...], what: str) -> dict[str, Any]:
    """One of our JSON files, with ``keys``; anything else raises :class:`RunFileError` naming it."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunFileError(f"{path}: not a readable {what} ({err}); delete it (the next sweep redoes what it "
                           "recorded)") from None
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise RunFileError(f"{path}: not a {what} (no {', '.join(missing)}); delete it (the next sweep redoes "
                           "what it recorded)")
    return obj


def read_result(path: Path) -> dict[str, Any]:
    return read_json(path, RESULT_KEYS, "run result")


def load_runs(out: Path) -> list[dict[str, Any]]:
    """Every finished run's JSON under ``out/runs/``, in a stable order."""
    return [read_result(p) for p in sorted(Path(out).glob(f"runs/*/{RESULT_FILE}"))]


def missing_marker(out: Path, task: str, preset: str, variant: str = "") -> Path:
    """One marker per task, preset and settings variant: sweeps of other models or seeds of the same
    task merge into it, a sweep with other settings gets its own."""
    suffix = f"-{variant}" if variant else ""
    return Path(out) / MISSING_DIR / f"{task}-{preset}{suffix}.json"


def failed_marker(out: Path, run_id: str) -> Path:
    return Path(out) / FAILED_DIR / f"{run_id}.json"


MARKER_KEYS = {MISSING_DIR: MISSING_KEYS, FAILED_DIR: FAILED_KEYS}


def load_marker(path: Path, kind: str) -> dict[str, Any]:
    return read_json(path, MARKER_KEYS[kind], f"'{kind}' marker")


def load_markers(out: Path, kind: str) -> list[dict[str, Any]]:
    """The sweep's ``missing`` or ``failed`` markers (small JSONs), in a stable order."""
    return [load_marker(p, kind) for p in sorted((Path(out) / kind).glob("*.json"))]
