"""The tables, rebuilt from every run JSON and marker under ``OUT``: ``results.csv``, ``results.md``,
``runs.csv`` and the DTN figure ``dtn_gates.png``.

Nothing but the files of :mod:`lra_dtn.app.artifacts` is read, so deleting the tables and running
``run_lra.py table --out OUT`` rebuilds them exactly, and a run can never be counted twice (its id is
its folder). The commands that ask for a table build it: ``train`` after its run, ``sweep`` after its
grid, ``table`` on demand; the engine only writes the run's own JSON.
"""
from __future__ import annotations

import csv
import io
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from lra_dtn.app import plots
from lra_dtn.app.artifacts import FAILED_DIR, MISSING_DIR, load_markers, load_runs
from lra_dtn.app.paper import LRA_TASK_NAMES, NOT_AVERAGED, OFFICIAL_AVG, OFFICIAL_LRA, OFFICIAL_MODEL_NAMES, official
from lra_dtn.app.results import BASELINE_NORM, Row, aggregate, model_order, norm_order, sort_key, task_order
from lra_dtn.app.stats import PairedDiff
from lra_dtn.workdirs import write_atomic

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


def mean_or_none(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def markdown_table(header: list[str], body: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |",
            *("| " + " | ".join(cells) + " |" for cells in body)]


def md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------------------------------------
# The tables

CSV_COLUMNS = ["preset", "variant", "task", "model", "norm", "prior", "data", "n", "seeds", "test_acc_mean_pct",
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
            "prior": row.prior,
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
        body.append([row.task, row.model, norm_label(row), str(row.n), fmt_acc(row), fmt_diff(row.diff), pct(val),
                     "" if sps is None else f"{sps * 1000:.1f}",
                     "" if not row.peak_mem_mb else f"{max(row.peak_mem_mb):.0f}",
                     "" if row.params is None else f"{row.params:,}",
                     pct(paper) if paper is not None else ("FAIL" if row.norm == BASELINE_NORM and row.task == "pathx"
                                                           and row.model in OFFICIAL_LRA else ""),
                     md_escape(row.data)])
    return markdown_table(header, body, "lllrrrrrrrrl")


def norm_label(row: Row) -> str:
    """The norm, with DTN's positional prior on the image tasks: ``dtn (2-D prior)``."""
    return f"{row.norm} ({row.prior} prior)" if row.prior else row.norm


def prior_note(rows: list[Row]) -> list[str]:
    """One sentence on the positional prior DTN rows used on the image tasks (``model.norm_prior``)."""
    tasks: dict[str, set[str]] = {}
    for row in rows:
        if row.prior:
            tasks.setdefault(row.prior, set()).add(row.task)
    if not tasks:
        return []
    used = "; ".join(f"the {prior} prior on {', '.join(sorted(names, key=task_order))}"
                     for prior, names in sorted(tasks.items(), reverse=True))
    return ["", f"DTN's positional prior on the image tasks: {used} (2-D: the pixel grid's offsets, the authors' "
                "prior; 1-D: raster token offsets, `--set model.norm_prior=1d`). Sequence tasks: 1-D."]


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
        lines += ["### By task (LRA layout)", "", *wide_table(group), *prior_note(group)]
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
    DTN gates figure. ``train`` rebuilds the tables after its run without the figure (a second or two of
    matplotlib each time); the sweep's end and ``run_lra.py table`` draw it."""
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
