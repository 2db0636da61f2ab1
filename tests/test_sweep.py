"""The sweep: the full grid into one table, missing data listed, kill-and-rerun skips and resumes."""
from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest

from lra_dtn.app import artifacts, engine, sweep
from lra_dtn.app.cli import main
from lra_dtn.data import DataError
from lra_dtn.norms import NORMS
from tasks import TASKS
from tasks.listops import SMOKE_DATA, ListOps

NORM = "dtn" if "dtn" in NORMS else "rms"  # the comparison norm: DTN once it is registered
SETTINGS = ["--max-steps", "4", "--set", "train.checkpoint_every=2", "--set", "train.eval_every=2",
            "--set", "train.batch_size=8", "--set", "data.num_train=64", "--set", "data.num_val=16",
            "--set", "data.num_test=24"]


class ShortListOps(ListOps):
    """A second, cheap task for the grid: ListOps with shorter expressions."""

    name = "listops_short"

    def spec(self, preset, model):
        model_cfg, train_cfg, _ = super().spec(preset, model)
        data = replace(SMOKE_DATA, min_length=5, max_length=20, max_depth=3)
        return replace(model_cfg, max_len=data.max_length), train_cfg, data


class NoDataTask(ListOps):
    """A task whose files are missing and cannot be generated."""

    name = "nodata"

    def source_files(self, data_dir, options):
        path = Path(data_dir) / "nodata" / "train.tsv"
        raise DataError(f"missing {path}: expected the release file nodata/train.tsv")


@pytest.fixture
def grid_tasks(monkeypatch):
    # Registered for this test only: other tests loop over every registered task.
    monkeypatch.setitem(TASKS._entries, "listops_short", ShortListOps)
    monkeypatch.setitem(TASKS._entries, "nodata", NoDataTask)


def sweep_args(tmp_path, tasks="listops,listops_short,nodata", models="transformer,bigbird", seeds="0,1"):
    return ["sweep", "--tasks", tasks, "--models", models, "--norms", f"ln,{NORM}", "--seeds", seeds,
            "--preset", "smoke", "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data"),
            "--no-progress", *SETTINGS]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def results_files(out: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in out.glob("runs/*/result.json")}


def test_killed_sweep_reruns_to_the_full_table(tmp_path, monkeypatch, grid_tasks):
    out = tmp_path / "out"
    saved, calls = engine.save_checkpoint, []

    def killed_on_fifth_checkpoint(path, state):  # 2 checkpoints a run: runs 1-2 finish, run 3 is cut
        saved(path, state)
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(engine, "save_checkpoint", killed_on_fifth_checkpoint)
    with pytest.raises(SystemExit) as interrupted:  # Ctrl-C: the CLI says what is kept, exits 130
        main(sweep_args(tmp_path))
    assert interrupted.value.code == 130
    monkeypatch.setattr(engine, "save_checkpoint", saved)
    done_before = results_files(out)
    cut = calls[-1].parent.name
    assert cut.startswith("listops-bigbird-ln-smoke-s0")  # seeds outermost, then task, model, norm
    assert sorted(done_before) == sorted(p.parent.name for p in calls[:4:2])
    assert (out / "runs" / cut / "checkpoint.pt").exists() and not (out / "runs" / cut / "result.json").exists()
    assert len(read_csv(out / "results.csv")) >= 1  # the sweep's table after each finished run

    # Run the same command again, recording which steps each run trains.
    steps: dict[str, list[int]] = {}
    real_train, real_lr = engine.train, engine.learning_rate
    current = []

    def spy_train(spec, *args, **kwargs):
        current[:] = [spec.run_id]
        return real_train(spec, *args, **kwargs)

    def spy_lr(step, cfg):
        steps.setdefault(current[0], []).append(step)
        return real_lr(step, cfg)

    monkeypatch.setattr(engine, "train", spy_train)
    monkeypatch.setattr(engine, "learning_rate", spy_lr)
    main(sweep_args(tmp_path))

    assert not set(done_before) & set(steps), "finished runs must be skipped"
    assert steps.pop(cut) == [2, 3], "the cut run resumes after its last checkpoint"
    assert len(steps) == 16 - 3 and all(s == [0, 1, 2, 3] for s in steps.values())
    after = results_files(out)
    assert len(after) == 16 and all(after[k] == v for k, v in done_before.items())

    # The table: 2 tasks x 2 models x 2 norms with both seeds, plus the missing task's rows.
    rows = read_csv(out / "results.csv")
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 8 and len({(r["task"], r["model"], r["norm"]) for r in rows}) == len(rows)
    assert {(r["task"], r["model"], r["norm"]) for r in ok} == {
        (t, m, n) for t in ("listops", "listops_short") for m in ("transformer", "bigbird") for n in ("ln", NORM)}
    assert all(r["n"] == "2" and r["seeds"] == "0 1" for r in ok)
    for r in ok:
        runs = [json.loads(after[f"{r['task']}-{r['model']}-{r['norm']}-smoke-s{s}-{r['variant']}"]) for s in (0, 1)]
        mean = 50 * (runs[0]["test_acc"] + runs[1]["test_acc"])
        assert float(r["test_acc_mean_pct"]) == pytest.approx(mean, abs=1e-3)
        if r["norm"] == NORM:
            assert r["diff_n"] == "2" and r["diff_ci95_low_pct"] and r["diff_ci95_high_pct"]
        assert float(r["sec_per_step"]) > 0 and float(r["peak_mem_mb"]) > 0
    ln_transformer = next(r for r in ok if r["task"] == "listops" and r["model"] == "transformer" and r["norm"] == "ln")
    assert ln_transformer["lra_paper_pct"] == "36.37"
    missing = [r for r in rows if r["status"] == "missing"]
    assert len(missing) == 4 and all(r["task"] == "nodata" and "nodata/train.tsv" in r["reason"] for r in missing)
    variant = missing[0]["variant"]  # SETTINGS change the smoke preset: one marker per task and variant
    marker = json.loads((out / "missing" / f"nodata-smoke-{variant}.json").read_text())
    assert marker["models"] == ["bigbird", "transformer"] and marker["seeds"] == [0, 1]
    md = (out / "results.md").read_text()
    assert "### Missing data" in md and "- **nodata** (generated" in md and "nodata/train.tsv" in md
    assert "LRA paper (official): Transformer" in md and "\n| nodata |" not in md  # one line, not a row per model
    assert len(read_csv(out / "runs.csv")) == 16
    assert all(list((out / "tb" / run_id).glob("events.out.tfevents.*")) for run_id in after)
    assert (out / "dtn_gates.png").exists() == (NORM == "dtn")

    # A third time: nothing to train, the same table.
    before = (out / "results.csv").read_bytes()
    steps.clear()
    main(sweep_args(tmp_path))
    assert steps == {} and (out / "results.csv").read_bytes() == before


def test_a_failed_run_is_recorded_and_the_grid_goes_on(tmp_path, monkeypatch):
    """One run raising does not stop the sweep; the table lists it; the next sweep retries it."""
    out = tmp_path / "out"

    def fake_train(spec, out, *args, fail=("listops-transformer-ln-smoke-s1",), **kwargs):
        if spec.run_id.startswith(fail):
            raise FloatingPointError("loss is nan at step 3")
        result = {"run_id": spec.run_id, "task": spec.task, "model": spec.model_name, "norm": spec.norm,
                  "preset": spec.preset, "seed": spec.seed, "config": spec.to_dict(), "test_acc": 0.5,
                  "val_acc": 0.5, "sec_per_step": 0.01, "peak_mem_mb": 10.0, "params": 1}
        artifacts.write_json(engine.run_dir(out, spec) / "result.json", result)
        return result

    monkeypatch.setattr(engine, "train", fake_train)
    args = sweep_args(tmp_path, tasks="listops", models="transformer", seeds="0,1")
    with pytest.raises(SystemExit, match=r"1 run\(s\) failed: listops-transformer-ln-smoke-s1"):
        main(args)
    assert len(list(out.glob("runs/*/result.json"))) == 3
    marker = json.loads(next((out / "failed").glob("*.json")).read_text())
    assert "FloatingPointError: loss is nan" in marker["error"]
    ln = next(r for r in read_csv(out / "results.csv") if r["norm"] == "ln")
    assert ln["n"] == "1" and ln["status"] == "partial" and "s1" in ln["reason"]
    assert "### Failed runs" in (out / "results.md").read_text()

    monkeypatch.setattr(engine, "train", lambda spec, out, *a, **k: fake_train(spec, out, fail=("none",)))
    main(args)
    assert not list((out / "failed").glob("*.json"))
    assert all(r["n"] == "2" and r["status"] == "ok" for r in read_csv(out / "results.csv"))


def test_names_are_checked_against_the_registries():
    assert sweep.parse_names("all", NORMS, "norms") == NORMS.names()
    assert sweep.parse_names("ln, rms,ln", NORMS, "norms") == ["ln", "rms"]
    with pytest.raises(ValueError, match=r"--norms: unknown norm 'nope'; choose from: ln, rms"):
        sweep.parse_names("ln,nope", NORMS, "norms")
    assert sweep.parse_seeds("0-2,7,1") == [0, 1, 2, 7]
    for text, complaint in (("a", "found 'a'"), ("0,,1", "found ''"), ("", "found ''"), ("-1", "found '-1'"),
                            ("3-1", "runs backwards; write 1-3")):
        with pytest.raises(ValueError, match=complaint):
            sweep.parse_seeds(text)
    with pytest.raises(ValueError, match="an empty name"):
        sweep.parse_names("ln,,rms", NORMS, "norms")


def test_cli_sweep_rejects_unknown_names_before_training(tmp_path):
    with pytest.raises(SystemExit, match=r"unknown model 'nope'; choose from: transformer"):
        main(["sweep", "--tasks", "listops", "--models", "transformer,nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"unknown task 'nope'"):
        main(["sweep", "--tasks", "nope", "--out", str(tmp_path)])
    assert not (tmp_path / "runs").exists()


def test_sweep_defaults_compare_ln_with_dtn(capsys):
    from lra_dtn.app.cli import build_parser

    args = build_parser().parse_args(["sweep"])
    assert (args.tasks, args.models, args.norms, args.seeds) == ("all", "all", "ln,dtn", "0,1,2")
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--tasks", "--models", "--norms", "--seeds", "--preset", "--grad-accum", "--precision", "--out"):
        assert option in text


def test_missing_tasks_of_several_sweeps_all_stay_in_the_table(tmp_path, grid_tasks, monkeypatch):
    """A second sweep of the same missing task with another model (or seed) adds to its marker; a
    sweep with other settings gets a marker of its own. Nothing listed before is dropped."""
    monkeypatch.setattr(engine, "train", lambda *a, **k: pytest.fail("no run of a missing task may train"))
    main(sweep_args(tmp_path, tasks="nodata", models="transformer", seeds="0"))
    main(sweep_args(tmp_path, tasks="nodata", models="bigbird", seeds="1"))
    main([*sweep_args(tmp_path, tasks="nodata", models="bigbird", seeds="0"), "--set", "train.lr=0.01"])
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert all(r["status"] == "missing" for r in rows)
    first = next(r["variant"] for r in rows if r["model"] == "transformer")
    assert sorted((r["model"], r["norm"]) for r in rows if r["variant"] == first) == sorted(
        (m, n) for m in ("transformer", "bigbird") for n in ("ln", NORM))
    assert sorted((r["model"], r["norm"]) for r in rows if r["variant"] != first) == [("bigbird", n) for n in sorted(("ln", NORM))]
    marker = json.loads((tmp_path / "out" / "missing" / f"nodata-smoke-{first}.json").read_text())
    assert marker["models"] == ["bigbird", "transformer"] and marker["seeds"] == [0, 1]
    assert len(list((tmp_path / "out" / "missing").glob("*.json"))) == 2


def test_a_damaged_result_stops_the_sweep_before_any_training(tmp_path, grid_tasks, monkeypatch):
    spec = sweep.plan(sweep_args_namespace(tmp_path))[0]
    bad = engine.run_dir(tmp_path / "out", spec) / "result.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"run_id": "x", "task"')
    monkeypatch.setattr(engine, "train", lambda *a, **k: pytest.fail("nothing may train"))
    with pytest.raises(SystemExit, match=f"error: {bad}: not a readable run result .*delete it"):
        main(sweep_args(tmp_path, tasks="listops", models="transformer", seeds="0"))


def sweep_args_namespace(tmp_path):
    from lra_dtn.app.cli import build_parser

    return build_parser().parse_args(sweep_args(tmp_path, tasks="listops", models="transformer", seeds="0"))
