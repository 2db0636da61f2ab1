"""Run artifacts: one JSON per run, and the tables rebuilt from all of them.

Data flows one way: ``OUT/runs/<run_id>/result.json`` (one per finished run), plus the sweep's
markers ``OUT/missing/<task>-<preset>[-<variant>].json`` (a task whose data is missing, with the reason) and
``OUT/failed/<run_id>.json`` (a run that raised) -> :func:`update_tables` -> ``results.csv``,
``results.md``, ``runs.csv`` and the DTN figure ``dtn_gates.png``. Nothing else is read, so deleting
the tables and running ``run_lra.py table --out OUT`` rebuilds them exactly, and a run can never be
counted twice (its id is its folder).

Every file is written to a temporary name in the same folder and renamed into place, so a crash
never leaves a half-written JSON, CSV or Markdown table behind.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

RESULT_FILE = "result.json"
MISSING_DIR = "missing"
FAILED_DIR = "failed"
BASELINE_NORM = "ln"

# LRA README "as of 8th November 2020" = paper Table 1 (spec §10.1), test accuracy in %.
# None = FAIL (Path-X). The paper's Avg is over the 5 tasks without Path-X.
LRA_TASK_NAMES = {"listops": "ListOps", "text": "Text", "retrieval": "Retrieval", "image": "Image",
                  "pathfinder": "Path", "pathx": "Path-X"}
OFFICIAL_LRA: dict[str, dict[str, float | None]] = {
    "transformer": {"listops": 36.37, "text": 64.27, "retrieval": 57.46, "image": 42.44, "pathfinder": 71.40,
                    "pathx": None},
    "bigbird": {"listops": 36.05, "text": 64.02, "retrieval": 59.29, "image": 40.83, "pathfinder": 74.87,
                "pathx": None},
    "reformer": {"listops": 37.27, "text": 56.10, "retrieval": 53.40, "image": 38.07, "pathfinder": 68.50,
                 "pathx": None},
}
OFFICIAL_AVG = {"transformer": 54.39, "bigbird": 55.01, "reformer": 50.67}
# Not in any Avg, ours or the paper's: the paper averages its 5 tasks without Path-X (every model FAILs it).
NOT_AVERAGED = frozenset({"pathx"})
OFFICIAL_MODEL_NAMES = {"transformer": "Transformer", "bigbird": "BigBird", "reformer": "Reformer"}


# ---------------------------------------------------------------------------------------------
# Files


class RunFileError(ValueError):
    """A file under ``OUT`` that should be one of ours (run result, marker, checkpoint) but is not:
    damaged or foreign. The message names the file and what to delete."""


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends, removed
    if it raises. So readers see the old file or the new one, never a part. The file gets the
    permissions a plain ``open`` would give (``mkstemp`` makes it owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_file`), synced to disk."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


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


# ---------------------------------------------------------------------------------------------
# Statistics (no scipy: the only quantile needed is t(0.975, df))

# Two-sided 95% quantiles t(0.975, df) for df = 1..30 (standard tables; checked in tests against a
# numerical integral of the t density).
T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
Z_975 = 1.959964


def t_quantile_975(df: int) -> float:
    """t(0.975, df): the table up to 30, then the Cornish-Fisher expansion (error < 1e-4 there)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); the std is None for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


@dataclass
class PairedDiff:
    """Mean of per-seed differences with its 95% paired t-interval (None when n = 1)."""

    mean: float
    n: int
    low: float | None
    high: float | None
    seeds: list[int]


def paired_diff(a: dict[int, float], b: dict[int, float]) -> PairedDiff | None:
    """``a - b`` over the seeds both have: a run and its baseline share the seed's data order and
    initialisation stream, so the per-seed difference cancels that noise."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    mean, std = mean_std(diffs)
    if std is None:
        return PairedDiff(mean, 1, None, None, seeds)
    half = t_quantile_975(len(diffs) - 1) * std / math.sqrt(len(diffs))
    return PairedDiff(mean, len(diffs), mean - half, mean + half, seeds)


# ---------------------------------------------------------------------------------------------
# Aggregation: one row per (preset, variant, task, model, norm)


def variant_of(run: dict[str, Any]) -> str:
    return (run.get("config") or {}).get("variant") or ""


def task_order(task: str) -> tuple[int, str]:
    """LRA's column order, then any other task alphabetically."""
    names = list(LRA_TASK_NAMES)
    return (names.index(task) if task in names else len(names), task)


def model_order(model: str) -> tuple[int, str]:
    """The LRA table's models first (Transformer, BigBird, Reformer), then any other."""
    names = list(OFFICIAL_MODEL_NAMES)
    return (names.index(model) if model in names else len(names), model)


def norm_order(norm: str) -> tuple[int, str]:
    return (0 if norm == BASELINE_NORM else 1, norm)


@dataclass
class Row:
    preset: str
    variant: str
    task: str
    model: str
    norm: str
    data: str = ""
    acc: dict[int, float] = field(default_factory=dict)  # seed -> test accuracy in %
    val: dict[int, float] = field(default_factory=dict)
    sec_per_step: list[float] = field(default_factory=list)
    peak_mem_mb: list[float] = field(default_factory=list)
    peak_mem_kind: str = ""
    params: int | None = None
    diff: PairedDiff | None = None  # vs the baseline norm, same task/model/preset/variant
    failed: list[str] = field(default_factory=list)  # run ids whose last attempt raised
    missing: str = ""  # the reason, when the task's data is missing and no run finished

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.preset, self.variant, self.task, self.model, self.norm)

    @property
    def n(self) -> int:
        return len(self.acc)

    def acc_mean_std(self) -> tuple[float | None, float | None]:
        return mean_std(list(self.acc.values())) if self.acc else (None, None)


def sort_key(row: Row) -> tuple:
    return (row.preset, row.variant, task_order(row.task), model_order(row.model), norm_order(row.norm))


def aggregate(runs: Iterable[dict[str, Any]], missing: Iterable[dict[str, Any]] = (),
              failed: Iterable[dict[str, Any]] = ()) -> list[Row]:
    """Group runs by (preset, settings variant, task, model, norm); add each non-baseline norm's
    paired difference to the baseline; add rows for missing tasks and failed runs."""
    rows: dict[tuple, Row] = {}

    def row_for(preset: str, variant: str, task: str, model: str, norm: str) -> Row:
        key = (preset, variant, task, model, norm)
        if key not in rows:
            rows[key] = Row(*key)
        return rows[key]

    for run in runs:
        row = row_for(run["preset"], variant_of(run), run["task"], run["model"], run["norm"])
        seed = int(run["seed"])
        row.acc[seed] = 100.0 * run["test_acc"]
        if run.get("val_acc") is not None:
            row.val[seed] = 100.0 * run["val_acc"]
        if run.get("sec_per_step") is not None:
            row.sec_per_step.append(run["sec_per_step"])
        if run.get("peak_mem_mb") is not None:
            row.peak_mem_mb.append(run["peak_mem_mb"])
            row.peak_mem_kind = run.get("peak_mem_kind") or row.peak_mem_kind
        row.params = run.get("params", row.params)
        row.data = run.get("data") or row.data
    for marker in failed:
        row = row_for(marker["preset"], marker.get("variant", ""), marker["task"], marker["model"], marker["norm"])
        if int(marker["seed"]) not in row.acc:
            row.failed.append(marker["run_id"])
    for marker in missing:
        for model in marker.get("models", []):
            for norm in marker.get("norms", []):
                row = row_for(marker["preset"], marker.get("variant", ""), marker["task"], model, norm)
                row.missing = marker["reason"]
                row.data = row.data or marker.get("data", "")
    for row in rows.values():
        base = rows.get((row.preset, row.variant, row.task, row.model, BASELINE_NORM))
        if row.norm != BASELINE_NORM and base is not None and row.acc and base.acc:
            row.diff = paired_diff(row.acc, base.acc)
    return sorted(rows.values(), key=sort_key)


# ---------------------------------------------------------------------------------------------
# Formatting


def pct(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def signed(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:+.{digits}f}".replace("-", "−")


def fmt_acc(row: Row) -> str:
    if not row.acc:
        return "missing" if row.missing else ("failed" if row.failed else "")
    mean, std = row.acc_mean_std()
    return pct(mean) if std is None else f"{pct(mean)} ± {pct(std)}"


def fmt_diff(diff: PairedDiff | None) -> str:
    """``+0.53 [−0.20, +1.26]``; a single pair has no interval: ``+0.53 [n/a]``."""
    if diff is None:
        return ""
    ci = "n/a" if diff.low is None else f"{signed(diff.low)}, {signed(diff.high)}"
    return f"{signed(diff.mean)} [{ci}]"


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def mean_or_none(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def official(model: str, task: str) -> float | None:
    return OFFICIAL_LRA.get(model, {}).get(task)


def markdown_table(header: list[str], body: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |",
            *("| " + " | ".join(cells) + " |" for cells in body)]


def md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------------------------------------
# The tables

CSV_COLUMNS = ["preset", "variant", "task", "model", "norm", "data", "n", "seeds", "test_acc_mean_pct",
               "test_acc_std_pct", "val_acc_mean_pct", "diff_vs_ln_pct", "diff_ci95_low_pct",
               "diff_ci95_high_pct", "diff_n", "sec_per_step", "peak_mem_mb", "peak_mem_kind", "params",
               "lra_paper_pct", "avg_over_tasks_pct", "avg_tasks", "status", "reason"]

RUN_COLUMNS = ["run_id", "task", "model", "norm", "preset", "seed", "val_acc", "test_acc", "test_n", "steps",
               "sec_per_step", "peak_mem_mb", "params", "world_size", "device", "data"]


def status_of(row: Row) -> tuple[str, str]:
    if row.acc:
        return ("ok" if not row.failed else "partial"), ("failed: " + ", ".join(row.failed) if row.failed else "")
    if row.missing:
        return "missing", row.missing
    return "failed", "failed: " + ", ".join(row.failed)


def averaged(rows: Iterable[Row]) -> dict[tuple[str, str, str, str], dict[str, float]]:
    """What the LRA "Avg" averages: per (preset, variant, model, norm), ``{task: mean test accuracy}``
    over the tasks with results, without Path-X (as the paper), in LRA order."""
    by_config: dict[tuple[str, str, str, str], dict[str, float]] = {}
    for row in sorted(rows, key=sort_key):
        if row.acc and row.task not in NOT_AVERAGED:
            by_config.setdefault((row.preset, row.variant, row.model, row.norm), {})[row.task] = row.acc_mean_std()[0]
    return by_config


def csv_rows(rows: list[Row]) -> list[dict[str, Any]]:
    out = []
    averages = averaged(rows)
    for row in rows:
        mean, std = row.acc_mean_std()
        accs = averages.get((row.preset, row.variant, row.model, row.norm), {})
        status, reason = status_of(row)
        diff = row.diff
        out.append({
            "preset": row.preset, "variant": row.variant, "task": row.task, "model": row.model, "norm": row.norm,
            "data": row.data, "n": row.n, "seeds": " ".join(str(s) for s in sorted(row.acc)),
            "test_acc_mean_pct": round(mean, 4) if mean is not None else None,
            "test_acc_std_pct": round(std, 4) if std is not None else None,
            "val_acc_mean_pct": round(mean_or_none(list(row.val.values())), 4) if row.val else None,
            "diff_vs_ln_pct": round(diff.mean, 4) if diff else None,
            "diff_ci95_low_pct": round(diff.low, 4) if diff and diff.low is not None else None,
            "diff_ci95_high_pct": round(diff.high, 4) if diff and diff.high is not None else None,
            "diff_n": diff.n if diff else None,
            "sec_per_step": mean_or_none(row.sec_per_step), "peak_mem_mb": max(row.peak_mem_mb, default=None),
            "peak_mem_kind": row.peak_mem_kind, "params": row.params,
            "lra_paper_pct": official(row.model, row.task) if row.norm == BASELINE_NORM else None,
            "avg_over_tasks_pct": round(sum(accs.values()) / len(accs), 4) if accs else None,
            "avg_tasks": " ".join(accs),
            "status": status, "reason": reason,
        })
    return out


def to_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def sections(rows: list[Row]) -> dict[tuple[str, str], list[Row]]:
    """Rows that belong together: the same preset and the same settings changed from it."""
    grouped: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        grouped.setdefault((row.preset, row.variant), []).append(row)
    return grouped


def wide_table(rows: list[Row]) -> list[str]:
    """The LRA layout: a row per model and norm, a column per task, and the average over tasks (without
    Path-X, as the paper); a Δ row per non-baseline norm; the official LRA rows of the same models, their
    Avg over the tasks our baseline row of that model has, so the two compare."""
    tasks = sorted({r.task for r in rows}, key=task_order)
    averaged_tasks = [t for t in tasks if t not in NOT_AVERAGED]
    averages = {key[2:]: accs for key, accs in averaged(rows).items()}  # one preset and variant: (model, norm)
    by_key = {(r.model, r.norm, r.task): r for r in rows}
    models = sorted({r.model for r in rows}, key=model_order)
    header = ["Model", "Norm", *(LRA_TASK_NAMES.get(t, t) for t in tasks), "Avg"]
    body = []

    def row_of(model: str, norm: str, task: str) -> Row | None:
        return by_key.get((model, norm, task))

    for model in models:
        norms = sorted({r.norm for r in rows if r.model == model}, key=norm_order)
        for norm in norms:
            cells = [fmt_acc(row_of(model, norm, t)) if row_of(model, norm, t) else "" for t in tasks]
            body.append([model, norm, *cells, avg_cell(list(averages.get((model, norm), {}).values()),
                                                       len(averaged_tasks))])
        for norm in norms:
            if norm == BASELINE_NORM:
                continue
            diffs = [row_of(model, norm, t).diff if row_of(model, norm, t) else None for t in tasks]
            present = [d.mean for t, d in zip(tasks, diffs) if d is not None and t not in NOT_AVERAGED]
            if any(d is not None for d in diffs):
                body.append([model, f"Δ {norm} − {BASELINE_NORM}", *(signed(d.mean) if d else "" for d in diffs),
                             avg_cell(present, len(averaged_tasks), signed)])
    for model in models:
        if model in OFFICIAL_LRA:
            ours = averages.get((model, BASELINE_NORM), {})
            values = [official(model, t) for t in tasks]
            body.append([f"LRA paper (official): {OFFICIAL_MODEL_NAMES[model]}, 5-task Avg {OFFICIAL_AVG[model]:.2f}",
                         BASELINE_NORM,
                         *(("FAIL" if t == "pathx" else "") if v is None else pct(v) for t, v in zip(tasks, values)),
                         avg_cell([official(model, t) for t in ours if official(model, t) is not None],
                                  len(averaged_tasks))])
    return markdown_table(header, body, "ll" + "r" * (len(tasks) + 1))


def avg_cell(values: list[float], num_tasks: int, style=pct) -> str:
    """The mean over the tasks the row has; says how many when it has fewer than the columns."""
    if not values:
        return ""
    text = style(sum(values) / len(values))
    return text if len(values) == num_tasks else f"{text} ({len(values)} of {num_tasks} tasks)"


def long_table(rows: list[Row]) -> list[str]:
    header = ["Task", "Model", "Norm", "n", "Test acc %", f"Δ vs {BASELINE_NORM} [95% CI] (pp)", "Val acc %",
              "ms/step", "Peak MB", "Params", "LRA paper", "Data"]
    body = []
    for row in rows:
        if not row.acc and not row.failed:
            continue  # a task without data: one line under "Missing data", not one per model and norm
        val = mean_or_none(list(row.val.values()))
        sps = mean_or_none(row.sec_per_step)
        paper = official(row.model, row.task) if row.norm == BASELINE_NORM else None
        body.append([row.task, row.model, row.norm, str(row.n), fmt_acc(row), fmt_diff(row.diff), pct(val),
                     "" if sps is None else f"{sps * 1000:.1f}",
                     "" if not row.peak_mem_mb else f"{max(row.peak_mem_mb):.0f}",
                     "" if row.params is None else f"{row.params:,}",
                     pct(paper) if paper is not None else ("FAIL" if row.norm == BASELINE_NORM and row.task == "pathx"
                                                           and row.model in OFFICIAL_LRA else ""),
                     md_escape(row.data)])
    return markdown_table(header, body, "lllrrrrrrrrl")


def diff_table(rows: list[Row]) -> list[str]:
    header = ["Task", "Model", "Norm", "Δ mean (pp)", "95% CI (paired t)", "n pairs", "Seeds"]
    body = [[r.task, r.model, f"{r.norm} − {BASELINE_NORM}", signed(r.diff.mean),
             "n/a" if r.diff.low is None else f"[{signed(r.diff.low)}, {signed(r.diff.high)}]", str(r.diff.n),
             " ".join(map(str, r.diff.seeds))] for r in rows if r.diff is not None]
    return markdown_table(header, body, "lllrrrl") if body else []


def to_markdown(rows: list[Row], num_runs: int, figure: str | None = None) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# LRA: LayerNorm vs DTN", "",
             f"Rebuilt from {num_runs} run JSON(s) on {stamp}. Test accuracy in %, mean ± sample std over seeds. "
             f"Δ = norm − {BASELINE_NORM} in percentage points over the seeds both have, with a 95% paired "
             "t-interval (n/a for one pair). Avg = mean over the tasks the row has, without Path-X as in the LRA "
             "paper (whose rows here average the tasks our LN row of that model has). Time per step excludes evaluation; peak memory is the run's peak "
             "(CUDA allocation on GPU, resident set on CPU)."]
    if figure:
        lines += ["", f"Learned DTN gates and positional windows: [{figure}]({figure})"]
    if not rows:
        lines += ["", "No runs yet."]
    for (preset, variant), group in sections(rows).items():
        title = f"## Preset `{preset}`" + (f", settings variant `{variant}` (changed from the preset; see each "
                                           f"run's config)" if variant else "")
        lines += ["", title, ""]
        if preset != "official":
            lines += [f"The `{preset}` preset is far smaller than the official configs (model, data, steps): "
                      "the LRA paper rows are a reference point, not a like-for-like comparison.", ""]
        lines += ["### By task (LRA layout)", "", *wide_table(group)]
        diffs = diff_table(group)
        if diffs:
            lines += ["", f"### Δ vs {BASELINE_NORM} per task and model", "", *diffs]
        lines += ["", "### All rows", "", *long_table(group)]
        missing = {(r.task, r.missing, r.data) for r in group if r.missing and not r.acc}
        if missing:
            lines += ["", "### Missing data (these tasks did not run)", ""]
            lines += [f"- **{task}**" + (f" ({md_escape(data)})" if data else "") + f": {md_escape(reason)}"
                      for task, reason, data in sorted(missing, key=lambda m: task_order(m[0]))]
        failed = [run_id for r in group for run_id in r.failed]
        if failed:
            lines += ["", "### Failed runs (see `failed/<run_id>.json`; the next sweep retries them)", ""]
            lines += [f"- `{run_id}`" for run_id in failed]
    return "\n".join(lines) + "\n"


def update_tables(out: Path, figure: bool = False) -> None:
    """Rebuild ``results.csv``, ``results.md``, ``runs.csv`` under ``out``; with ``figure``, also the
    DTN gates figure. The engine calls this after every run without the figure (a second or two of
    matplotlib each time); the sweep's end and ``run_lra.py table`` draw it."""
    from lra_dtn import plots

    out = Path(out)
    runs = load_runs(out)
    rows = aggregate(runs, load_markers(out, MISSING_DIR), load_markers(out, FAILED_DIR))
    if figure:
        try:
            plots.write_dtn_figure(runs, out / plots.FIGURE_FILE)
        except ImportError as err:  # matplotlib is a dependency, but the table must not hinge on it
            print(f"[results] no DTN figure: {err}")
    figure_name = plots.FIGURE_FILE if (out / plots.FIGURE_FILE).exists() else None
    write_atomic(out / "results.csv", to_csv(csv_rows(rows), CSV_COLUMNS))
    write_atomic(out / "runs.csv", to_csv([{c: run.get(c) for c in RUN_COLUMNS} for run in runs], RUN_COLUMNS))
    write_atomic(out / "results.md", to_markdown(rows, len(runs), figure_name))

