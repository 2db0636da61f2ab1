"""Run artifacts: one JSON per run, and the tables rebuilt from all of them.

Every file is written to a temporary name in the same folder and renamed into place, so a crash
never leaves a half-written JSON, CSV or Markdown table behind.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

RESULT_FILE = "result.json"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def load_runs(out: Path) -> list[dict[str, Any]]:
    """Every finished run's JSON under ``out/runs/``, in a stable order."""
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob(f"runs/*/{RESULT_FILE}"))]


COLUMNS = ["task", "model", "norm", "preset", "seed", "val_acc", "test_acc", "steps", "sec_per_step",
           "peak_mem_mb", "params", "data"]


def table_rows(runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{c: run.get(c) for c in COLUMNS} for run in runs]


def to_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def to_markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def update_tables(out: Path) -> None:
    """Rebuild ``out/results.csv`` and ``out/results.md`` from every run JSON under ``out``."""
    rows = table_rows(load_runs(out))
    write_atomic(Path(out) / "results.csv", to_csv(rows, COLUMNS))
    write_atomic(Path(out) / "results.md", to_markdown(rows, COLUMNS))
