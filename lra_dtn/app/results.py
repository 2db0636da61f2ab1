"""Aggregation: the run JSONs and markers grouped into one row per (preset, settings variant, task,
model, norm), with each norm's paired difference to the baseline norm over the seeds both have."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from lra_dtn.app.paper import LRA_TASK_NAMES, OFFICIAL_MODEL_NAMES
from lra_dtn.app.stats import PairedDiff, mean_std, paired_diff

BASELINE_NORM = "ln"



def run_variant(run: dict[str, Any]) -> str:
    """The settings variant a run JSON records (``""``: the preset itself; see ``specs.variant_hash``)."""
    return (run.get("config") or {}).get("variant") or ""


def is_grid(pos_weight: Any) -> bool:
    """A DTN slot's stored ``pos_proj`` weight has 3 features (dx, dy, dx^2 + dy^2) with the 2-D prior,
    2 (j - i, (j - i)^2) with the 1-D one."""
    return len(pos_weight[0]) == 3


def run_prior(run: dict[str, Any]) -> str:
    """DTN's positional prior in a run on a task whose tokens form an image grid: ``"2-D"`` or ``"1-D"``
    (``model.norm_prior``), read from the weights the run stored; ``""`` for other norms and for tasks
    without a grid."""
    params = run.get("norm_params") or {}
    if not params or not ((run.get("config") or {}).get("model") or {}).get("grid"):
        return ""
    return "2-D" if is_grid(next(iter(params.values()))["pos_weight"]) else "1-D"


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
    prior: str = ""  # DTN's positional prior on an image task: "2-D" or "1-D" (see run_prior)

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
        row = row_for(run["preset"], run_variant(run), run["task"], run["model"], run["norm"])
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
        row.prior = run_prior(run) or row.prior
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
