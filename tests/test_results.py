"""The table from known run JSONs: means, stds, the paired DTN − LN interval, Avg, official rows, figure."""
from __future__ import annotations

import csv
import math
import os

import numpy as np
import pytest

from lra_dtn.app import artifacts, plots, stats, tables


def fake_run(out, task, model, norm, seed, acc, preset="cpu", variant="", norm_params=None, **extra):
    run_id = f"{task}-{model}-{norm}-{preset}-s{seed}" + (f"-{variant}" if variant else "")
    run = {"run_id": run_id, "task": task, "model": model, "norm": norm, "preset": preset, "seed": seed,
           "config": {"variant": variant}, "test_acc": acc, "val_acc": acc - 0.01, "sec_per_step": 0.02,
           "peak_mem_mb": 100.0 + seed, "peak_mem_kind": "cpu_peak_rss", "params": 1234, "data": f"{task} data",
           "norm_params": norm_params or {}, **extra}
    artifacts.write_json(out / "runs" / run_id / "result.json", run)
    return run


def read_csv(path):
    with open(path, newline="") as f:
        return {(r["preset"], r["task"], r["model"], r["norm"]) + ((r["variant"],) if r["variant"] else ()): r
                for r in csv.DictReader(f)}


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) by Simpson's rule on the t density (independent of the table under test)."""
    x = np.linspace(0.0, t, 200_001)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = np.exp(log_c - (df + 1) / 2 * np.log1p(x**2 / df))
    h = x[1] - x[0]
    return 0.5 + h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum())


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 10, 19, 29, 30, 31, 40, 100])
def test_t_quantile_is_the_975_point(df):
    assert t_cdf(stats.t_quantile_975(df), df) == pytest.approx(0.975, abs=2e-5)


def test_dtn_minus_ln_is_a_paired_t_interval_over_shared_seeds(tmp_path):
    out = tmp_path
    for seed, (ln, dtn) in enumerate([(0.50, 0.53), (0.52, 0.56), (0.54, 0.55)]):
        fake_run(out, "listops", "transformer", "ln", seed, ln)
        fake_run(out, "listops", "transformer", "dtn", seed, dtn)
    fake_run(out, "listops", "transformer", "dtn", 3, 0.90)  # no LN partner: in the mean, not in the diff
    fake_run(out, "text", "transformer", "ln", 0, 0.60)
    fake_run(out, "text", "transformer", "dtn", 0, 0.61)  # one pair: no interval
    tables.update_tables(out, figure=False)
    rows = read_csv(out / "results.csv")

    dtn = rows[("cpu", "listops", "transformer", "dtn")]
    # diffs 3, 4, 1 pp: mean 8/3, sd sqrt(7/3), half width t(0.975, 2) * sd / sqrt(3) = 4.3027 * 0.88192
    assert float(dtn["diff_vs_ln_pct"]) == pytest.approx(8 / 3, abs=1e-4)
    half = 4.3027 * math.sqrt(7 / 3) / math.sqrt(3)
    assert float(dtn["diff_ci95_low_pct"]) == pytest.approx(8 / 3 - half, abs=1e-3)
    assert float(dtn["diff_ci95_high_pct"]) == pytest.approx(8 / 3 + half, abs=1e-3)
    assert dtn["diff_n"] == "3" and dtn["n"] == "4" and dtn["seeds"] == "0 1 2 3"
    assert float(dtn["test_acc_mean_pct"]) == pytest.approx(100 * (0.53 + 0.56 + 0.55 + 0.90) / 4, abs=1e-3)
    ln = rows[("cpu", "listops", "transformer", "ln")]
    assert float(ln["test_acc_mean_pct"]) == pytest.approx(52.0) and float(ln["test_acc_std_pct"]) == pytest.approx(2.0)
    assert ln["diff_vs_ln_pct"] == "" and ln["lra_paper_pct"] == "36.37" and dtn["lra_paper_pct"] == ""
    assert ln["peak_mem_mb"] == "102.0" and float(ln["sec_per_step"]) == pytest.approx(0.02)
    text_dtn = rows[("cpu", "text", "transformer", "dtn")]
    assert float(text_dtn["diff_vs_ln_pct"]) == pytest.approx(1.0) and text_dtn["diff_ci95_low_pct"] == ""

    md = (out / "results.md").read_text()
    assert "| listops | transformer | dtn | 4 | 63.50 ± 17.71 | +2.67 [−1.13, +6.46] |" in md
    assert "+1.00 [n/a]" in md
    # Wide table: tasks as columns, Avg over the tasks of the row, the official row beside ours.
    assert "| Model | Norm | ListOps | Text | Avg |" in md
    assert "| transformer | ln | 52.00 ± 2.00 | 60.00 | 56.00 |" in md
    assert "| transformer | Δ dtn − ln | +2.67 | +1.00 | +1.83 |" in md
    assert "| LRA paper (official): Transformer, 5-task Avg 54.39 | ln | 36.37 | 64.27 | 50.32 |" in md


def test_presets_and_settings_never_mix_and_missing_tasks_are_listed(tmp_path):
    out = tmp_path
    fake_run(out, "listops", "bigbird", "ln", 0, 0.30, preset="smoke")
    fake_run(out, "listops", "bigbird", "ln", 0, 0.40, preset="cpu")
    fake_run(out, "listops", "bigbird", "ln", 0, 0.50, preset="cpu", variant="xabc123")
    fake_run(out, "listops", "bigbird", "dtn", 0, 0.55, preset="cpu", variant="xabc123")
    artifacts.write_json(artifacts.missing_marker(out, "text", "cpu"), {
        "task": "text", "preset": "cpu", "variant": "", "reason": "missing data/text/train.tsv: expected ...",
        "models": ["bigbird"], "norms": ["dtn", "ln"]})
    tables.update_tables(out, figure=False)
    rows = read_csv(out / "results.csv")
    assert rows[("smoke", "listops", "bigbird", "ln")]["test_acc_mean_pct"] == "30.0"
    assert len(rows) == 6
    cpu = [r for k, r in rows.items() if k[0] == "cpu" and r["task"] == "listops"]
    assert sorted((r["variant"], r["norm"], r["n"]) for r in cpu) == [("", "ln", "1"), ("xabc123", "dtn", "1"),
                                                                     ("xabc123", "ln", "1")]
    assert float(next(r for r in cpu if r["norm"] == "dtn")["diff_vs_ln_pct"]) == pytest.approx(5.0)
    assert rows[("cpu", "text", "bigbird", "dtn")]["status"] == "missing"
    md = (out / "results.md").read_text()
    assert md.count("## Preset `cpu`") == 2 and md.count("## Preset `smoke`") == 1
    assert "- **text**: missing data/text/train.tsv" in md
    assert "| bigbird | ln | 40.00 | missing | 40.00 (1 of 2 tasks) |" in md


def dtn_params(offsets, gate=0.0, layers=2):
    """Norm slots as the engine stores them: sigmoid gates, pos_proj weights (H, 2) on (j-i, (j-i)^2)."""
    sig = 1 / (1 + math.exp(-gate))
    slot = {"gate_mean": [sig] * len(offsets), "gate_var": [sig] * len(offsets),
            "pos_weight": [[2.0 * k, -1.0] for k in offsets]}
    names = [f"encoder.blocks.{i}.{n}" for i in range(layers) for n in ("attn_norm", "mlp_norm")]
    return {name: slot for name in names + ["encoder.final_norm"]}


def test_windows_centre_on_the_learned_offset():
    # The local init: weight 2k on j - i and -1 on (j - i)^2 is exp(-((j - i) - k)^2): peak at j - i = k.
    p = plots.windows(np.array([[2.0 * k, -1.0] for k in (-1.5, 0.0, 3.0)]))
    d = np.arange(-plots.MAX_OFFSET, plots.MAX_OFFSET + 1)
    assert np.allclose(p.sum(-1), 1) and list(d[p.argmax(-1)]) == [-2, 0, 3]  # -1.5: tie of -2 and -1
    assert p[0, d == -2] == pytest.approx(p[0, d == -1])
    spread = plots.window_std(p)
    assert spread[1] == pytest.approx(math.sqrt(2 * (math.exp(-1) + 4 * math.exp(-4) + 9 * math.exp(-9)) /
                                                (1 + 2 * math.exp(-1) + 2 * math.exp(-4) + 2 * math.exp(-9))), rel=1e-4)
    assert plots.window_std(plots.windows(np.zeros((1, 2))))[0] == pytest.approx(plots.FLAT_STD)
    assert plots.FLAT_STD == pytest.approx(math.sqrt((65**2 - 1) / 12))


def test_dtn_figure_is_written_next_to_the_table_only_with_dtn_runs(tmp_path):
    fake_run(tmp_path, "listops", "transformer", "ln", 0, 0.5)
    tables.update_tables(tmp_path, figure=True)
    assert not (tmp_path / plots.FIGURE_FILE).exists() and "dtn_gates.png" not in (tmp_path / "results.md").read_text()

    for seed, gate in enumerate([1.0, 3.0]):
        params = dtn_params([-1.5, -0.5, 0.5, 1.5], gate)
        fake_run(tmp_path, "listops", "transformer", "dtn", seed, 0.5, norm_params=params)
    params = dtn_params([0, 1], 0.0, layers=11)
    for slot in params.values():
        slot["gate_mean"] = None  # dtn_var: no mean gate
    fake_run(tmp_path, "listops", "transformer", "dtn_var", 0, 0.5, norm_params=params)
    tables.update_tables(tmp_path, figure=True)
    png = tmp_path / plots.FIGURE_FILE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "dtn_gates.png" in (tmp_path / "results.md").read_text()
    assert not list(tmp_path.glob(".dtn_gates*"))  # no temporary file left behind

    groups = plots.dtn_groups(artifacts.load_runs(tmp_path))
    dtn = next(g for g in groups if "/ dtn " in g.label)
    assert dtn.seeds == [0, 1] and dtn.slots[:2] == ["0.attn_norm", "0.mlp_norm"] and dtn.slots[-1] == "final_norm"
    mean_gate = (1 / (1 + math.exp(-1)) + 1 / (1 + math.exp(-3))) / 2
    assert np.allclose(dtn.gate_mean, mean_gate) and dtn.window.shape == (5, 4, 65)
    var_only = next(g for g in groups if "dtn_var" in g.label)
    assert var_only.gate_mean is None and var_only.slots[-2:] == ["10.mlp_norm", "final_norm"]


def test_avg_leaves_out_path_x_for_ours_and_the_paper_alike_and_is_in_the_csv(tmp_path):
    out = tmp_path
    for task, acc in (("listops", 0.40), ("pathfinder", 0.60), ("pathx", 0.50)):
        fake_run(out, task, "transformer", "ln", 0, acc)
    fake_run(out, "listops", "reformer", "ln", 0, 0.30)
    tables.update_tables(out, figure=False)
    rows = read_csv(out / "results.csv")
    for task in ("listops", "pathfinder", "pathx"):  # the same (model, norm) Avg on each of its rows
        row = rows[("cpu", task, "transformer", "ln")]
        assert float(row["avg_over_tasks_pct"]) == pytest.approx(50.0) and row["avg_tasks"] == "listops pathfinder"
    assert rows[("cpu", "listops", "reformer", "ln")]["avg_over_tasks_pct"] == "30.0"
    md = (out / "results.md").read_text()
    assert "| transformer | ln | 40.00 | 60.00 | 50.00 | 50.00 |" in md
    # The paper's rows average the tasks our LN row of that model has: (36.37 + 71.40) / 2, 37.27 alone.
    assert "| LRA paper (official): Transformer, 5-task Avg 54.39 | ln | 36.37 | 71.40 | FAIL | 53.89 |" in md
    assert "| LRA paper (official): Reformer, 5-task Avg 50.67 | ln | 37.27 | 68.50 | FAIL | 37.27 (1 of 2 tasks) |" in md


@pytest.mark.parametrize("text, complaint", [("{\"task\": \"listops\"", "not a readable run result"),
                                             ("{\"task\": \"listops\"}", "no run_id, model"), ("[]", "no run_id")])
def test_a_damaged_result_is_named_with_what_to_delete(tmp_path, text, complaint):
    fake_run(tmp_path, "listops", "transformer", "ln", 0, 0.4)
    bad = tmp_path / "runs" / "listops-transformer-ln-cpu-s0" / "result.json"
    bad.write_text(text)
    with pytest.raises(artifacts.RunFileError, match=complaint) as error:
        tables.update_tables(tmp_path)
    assert str(bad) in str(error.value) and "delete it" in str(error.value)


def test_written_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        fake_run(tmp_path, "listops", "transformer", "ln", 0, 0.4)
        tables.update_tables(tmp_path, figure=False)
    finally:
        os.umask(old)
    for name in ("results.csv", "results.md", "runs.csv", "runs/listops-transformer-ln-cpu-s0/result.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_dtn_rows_on_image_tasks_say_which_positional_prior_they_used(tmp_path):
    def slot(features):  # a norm slot as the engine stores it: pos_proj weights (H, 2) or, 2-D prior, (H, 3)
        return {"encoder.final_norm": {"gate_mean": [0.5] * 2, "gate_var": [0.5] * 2, "pos_weight": [[0.0] * features] * 2}}

    image = {"variant": "", "model": {"grid": [32, 32]}}
    fake_run(tmp_path, "pathfinder", "transformer", "ln", 0, 0.5, config=image)
    fake_run(tmp_path, "pathfinder", "transformer", "dtn", 0, 0.52, norm_params=slot(3), config=image)
    fake_run(tmp_path, "pathfinder", "transformer", "dtn", 0, 0.51, variant="x1d", norm_params=slot(2),
             config=dict(image, variant="x1d"))
    fake_run(tmp_path, "listops", "transformer", "dtn", 0, 0.4, norm_params=slot(2), config={"variant": "", "model": {}})
    tables.update_tables(tmp_path, figure=False)
    rows = read_csv(tmp_path / "results.csv")
    assert rows[("cpu", "pathfinder", "transformer", "dtn")]["prior"] == "2-D"
    assert rows[("cpu", "pathfinder", "transformer", "dtn", "x1d")]["prior"] == "1-D"
    assert rows[("cpu", "listops", "transformer", "dtn")]["prior"] == ""  # a sequence: no choice to report
    assert rows[("cpu", "pathfinder", "transformer", "ln")]["prior"] == ""
    md = (tmp_path / "results.md").read_text()
    assert "| pathfinder | transformer | dtn (2-D prior) |" in md and "| pathfinder | transformer | dtn (1-D prior) |" in md
    assert "DTN's positional prior on the image tasks: the 2-D prior on pathfinder (" in md
