"""The learned DTN gates and positional windows: "how local does each head become?" at a glance.

Reads what the engine stores per norm slot in ``result["norm_params"]``: ``sigmoid(gate_mean)`` and
``sigmoid(gate_var)`` per head (``gate_mean`` is None for ``dtn_var``) and the ``pos_proj`` weight
``(H, 2)`` on the features ``(j - i, (j - i)^2)``. A head's window over offsets ``d = j - i`` is
``softmax_d(w1 * d + w2 * d^2)`` (the projection's bias cancels in the softmax). With the 2-D prior
(image tasks) the weight is ``(H, 3)`` on ``(dx, dy, dx^2 + dy^2)`` and each head's window is a small
image around the output pixel. Runs of the same preset, settings, task, model, norm and prior are
averaged over seeds (gates and window probabilities).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from lra_dtn.app.results import is_grid, model_order, run_variant, task_order
from lra_dtn.workdirs import atomic_file

FIGURE_FILE = "dtn_gates.png"
MAX_OFFSET = 32  # the window is drawn over j - i in [-32, 32]
FLAT_STD = float(np.arange(-MAX_OFFSET, MAX_OFFSET + 1).std())  # 18.76: a window that is not local at all
MAX_OFFSET_2D = 6  # 2-D windows are drawn over dx, dy in [-6, 6]
FLAT_STD_2D = float(np.sqrt(2) * np.arange(-MAX_OFFSET_2D, MAX_OFFSET_2D + 1).std())  # 5.29 pixels


def natural_key(text: str) -> list:
    """``blocks.10`` after ``blocks.2``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def slot_label(name: str) -> str:
    """``encoder.blocks.0.attn_norm`` -> ``0.attn_norm``; ``encoder.final_norm`` -> ``final_norm``."""
    return re.sub(r"^(encoder\.)?(blocks\.)?", "", name)


def windows(pos_weight: np.ndarray, max_offset: int = MAX_OFFSET) -> np.ndarray:
    """``(..., H, 2)`` projection weights -> ``(..., H, 2*max_offset+1)`` window probabilities."""
    d = np.arange(-max_offset, max_offset + 1, dtype=np.float64)
    logits = pos_weight[..., 0:1] * d + pos_weight[..., 1:2] * d**2
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=-1, keepdims=True)


def window_std(p: np.ndarray, max_offset: int = MAX_OFFSET) -> np.ndarray:
    """Spread (in tokens) of each window: small = a local head, ``FLAT_STD`` = no locality left."""
    d = np.arange(-max_offset, max_offset + 1, dtype=np.float64)
    mean = (p * d).sum(-1, keepdims=True)
    return np.sqrt((p * (d - mean) ** 2).sum(-1))


def grid_windows(pos_weight: np.ndarray, max_offset: int = MAX_OFFSET_2D) -> np.ndarray:
    """``(..., H, 3)`` weights on ``(dx, dy, dx^2 + dy^2)`` -> ``(..., H, 2m+1, 2m+1)`` probabilities over
    the offsets (output minus source) ``[dy + m, dx + m]``, ``m = max_offset``."""
    d = np.arange(-max_offset, max_offset + 1, dtype=np.float64)
    dy, dx = d[:, None], d[None, :]
    w = pos_weight[..., None, None]
    logits = w[..., 0, :, :] * dx + w[..., 1, :, :] * dy + w[..., 2, :, :] * (dx**2 + dy**2)
    logits -= logits.max(axis=(-2, -1), keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=(-2, -1), keepdims=True)


def grid_window_std(p: np.ndarray, max_offset: int = MAX_OFFSET_2D) -> np.ndarray:
    """Spread (in pixels, both axes) of each 2-D window: ``FLAT_STD_2D`` = no locality left."""
    d = np.arange(-max_offset, max_offset + 1, dtype=np.float64)
    py, px = p.sum(-1), p.sum(-2)  # marginals over dy and dx
    var = [(q * (d - (q * d).sum(-1, keepdims=True)) ** 2).sum(-1) for q in (py, px)]
    return np.sqrt(var[0] + var[1])


@dataclass
class DTNGroup:
    """One (preset, variant, task, model, norm) averaged over its seeds; arrays are (slots, heads[, ...])."""

    label: str
    slots: list[str]
    gate_mean: np.ndarray | None
    gate_var: np.ndarray
    window: np.ndarray  # (slots, heads, offsets) or, 2-D prior, (slots, heads, dy, dx)
    seeds: list[int]

    @property
    def grid(self) -> bool:
        return self.window.ndim == 4


def dtn_groups(runs: Iterable[dict[str, Any]]) -> list[DTNGroup]:
    """Runs with DTN parameters, grouped and averaged over seeds."""
    grouped: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        if run.get("norm_params"):
            prior = "2d" if is_grid(next(iter(run["norm_params"].values()))["pos_weight"]) else "1d"
            key = (run["preset"], run_variant(run), run["task"], run["model"], run["norm"], prior)
            grouped.setdefault(key, []).append(run)
    groups = []

    def order(key: tuple) -> tuple:
        preset, variant, task, model, norm, prior = key
        return (preset, variant, task_order(task), model_order(model), norm, prior)

    for (preset, variant, task, model, norm, prior), members in sorted(grouped.items(), key=lambda kv: order(kv[0])):
        slots = sorted(members[0]["norm_params"], key=natural_key)
        members = [m for m in members if sorted(m["norm_params"], key=natural_key) == slots]
        params = [[m["norm_params"][s] for s in slots] for m in members]
        has_mean = all(p["gate_mean"] is not None for run in params for p in run)
        gate_mean = np.mean([[p["gate_mean"] for p in run] for run in params], axis=0) if has_mean else None
        gate_var = np.mean([[p["gate_var"] for p in run] for run in params], axis=0)
        prior_windows = grid_windows if prior == "2d" else windows
        window = np.mean([prior_windows(np.asarray([p["pos_weight"] for p in run], dtype=np.float64))
                          for run in params], axis=0)
        seeds = sorted(int(m["seed"]) for m in members)
        label = (f"{task} / {model} / {norm}{' 2-D' if prior == '2d' else ''}  ({preset}"
                 f"{', ' + variant if variant else ''}; seeds {seeds})")
        groups.append(DTNGroup(label, [slot_label(s) for s in slots], gate_mean, gate_var, window, seeds))
    return groups


def _heatmap(ax, values: np.ndarray, slots: list[str], title: str, vmin: float, vmax: float, cmap: str,
             digits: int) -> Any:
    image = ax.imshow(values, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(values.shape[1]), [f"h{h}" for h in range(values.shape[1])], fontsize=7)
    ax.set_yticks(range(len(slots)), slots, fontsize=7)
    if values.size <= 160:
        for (i, j), v in np.ndenumerate(values):
            light = (v - vmin) / max(vmax - vmin, 1e-9) < 0.6
            ax.text(j, i, f"{v:.{digits}f}", ha="center", va="center", fontsize=6,
                    color="white" if light else "black")
    return image


def _grid_windows(ax, group: DTNGroup) -> None:
    """Each head's 2-D window as a small image (rows: slots, columns: heads), drawn around the output
    pixel at the centre of its tile: a dark pixel is where that head's sources lie (source = output
    minus offset, so the offsets are flipped on both axes). Each tile is scaled to its own peak, so
    that a wide window's shape shows beside a sharp one."""
    slots, num_heads, side, _ = group.window.shape
    cell = side + 1
    mosaic = np.full((slots * cell - 1, num_heads * cell - 1), np.nan)
    for s in range(slots):
        for h in range(num_heads):
            tile = group.window[s, h, ::-1, ::-1]
            mosaic[s * cell : s * cell + side, h * cell : h * cell + side] = tile / tile.max()
    ax.imshow(mosaic, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([h * cell + side // 2 for h in range(num_heads)], [f"h{h}" for h in range(num_heads)], fontsize=7)
    ax.set_yticks([s * cell + side // 2 for s in range(slots)], group.slots, fontsize=7)
    ax.set_title(f"2-D window per head: its sources around the output pixel\n(tile centre, ±{MAX_OFFSET_2D} px; "
                 "each tile scaled to its peak)", fontsize=9)


def write_dtn_figure(runs: Iterable[dict[str, Any]], path: Path) -> Path | None:
    """Draw every DTN group into one PNG at ``path`` (atomically); None, and no file, without DTN runs."""
    groups = dtn_groups(runs)
    path = Path(path)
    if not groups:
        path.unlink(missing_ok=True)  # a figure of runs no longer under OUT would mislead
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = max(g.gate_var.shape[1] for g in groups)
    height_per_group = max(2.6, 0.28 * max(len(g.slots) for g in groups) * max(1.0, heads / 8) + 1.4)
    fig, axes = plt.subplots(len(groups), 4, figsize=(19, height_per_group * len(groups) + 0.8), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 1, 1.6]})
    fig.suptitle("How local does each head become? DTN mixes per head: μ = λμ·μ_LN + (1−λμ)·μ_window, "
                 "σ² likewise with λσ; λ → 1 means LayerNorm statistics, λ → 0 means the positional window's",
                 fontsize=10)
    for row, group in zip(axes, groups):
        if group.gate_mean is not None:
            _heatmap(row[0], group.gate_mean, group.slots, f"{group.label}\nλμ = sigmoid(gate_mean)", 0, 1,
                     "viridis", 2)
        else:
            row[0].text(0.5, 0.5, f"{group.label}\n\nno mean gate: μ = μ_LN", ha="center", va="center",
                        fontsize=9, wrap=True)
            row[0].set_axis_off()
        _heatmap(row[1], group.gate_var, group.slots, "λσ = sigmoid(gate_var)", 0, 1, "viridis", 2)
        if group.grid:
            spread = grid_window_std(group.window)
            _heatmap(row[2], spread, group.slots, f"2-D window spread σ in pixels (small = local; {FLAT_STD_2D:.1f} "
                     "= flat)", 0, FLAT_STD_2D, "magma", 1)
            _grid_windows(row[3], group)
            continue
        spread = window_std(group.window)
        _heatmap(row[2], spread, group.slots, f"window spread σ in tokens (small = local; {FLAT_STD:.1f} = flat)",
                 0, FLAT_STD, "magma", 1)
        slots, num_heads, width = group.window.shape
        ax = row[3]
        ax.imshow(group.window.reshape(slots * num_heads, width), aspect="auto", cmap="Blues",
                  extent=(-MAX_OFFSET - 0.5, MAX_OFFSET + 0.5, slots * num_heads - 0.5, -0.5),
                  vmin=0, vmax=float(group.window.max()))
        for s in range(1, slots):
            ax.axhline(s * num_heads - 0.5, color="0.5", lw=0.5)
        ax.set_yticks([s * num_heads + (num_heads - 1) / 2 for s in range(slots)], group.slots, fontsize=7)
        ax.set_xlabel("offset j − i (source i before output j: positive)", fontsize=8)
        ax.set_title(f"positional window per head (rows: {num_heads} heads per slot), softmax over |j − i| ≤ "
                     f"{MAX_OFFSET}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    try:
        with atomic_file(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=90, format="png")
    finally:
        plt.close(fig)
    return path
