"""Multi-process training through torchrun (gloo on CPU), gradient accumulation and bf16 autocast.

Dropout is off in the equivalence tests, so the only randomness is the data order and the init,
which do not depend on the number of processes: two processes each taking half of the global batch,
or one process taking it in micro-batches, must train the same model as one process taking it whole.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lra_dtn.app import engine
from lra_dtn.app.specs import make_spec
from tasks import TASKS
from tasks.listops import SMOKE_DATA

ROOT = Path(__file__).resolve().parents[1]
NO_DROPOUT = ["model.dropout=0", "model.attn_dropout=0"]
STEPS = 6
GLOBAL_BATCH = 16  # the smoke preset's


def spec(*settings: str):
    return make_spec("listops", "transformer", "ln", "smoke", seed=0,
                     settings=[f"train.steps={STEPS}", "train.eval_every=3", *NO_DROPOUT, *settings])


def train_here(tmp_path: Path, name: str, *settings: str) -> dict:
    TASKS.get("listops")().prepare(tmp_path / "data", spec(*settings).data)
    return engine.train(spec(*settings), tmp_path / name, tmp_path / "data", progress=False, device="cpu")


def test_two_gloo_processes_write_one_result_equal_to_one_process(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "run_lra.py", "--task", "listops", "--model", "transformer", "--norm", "ln", "--preset", "smoke",
               "--max-steps", str(STEPS), "--grad-accum", "2", "--set", "train.eval_every=3",
               *(a for s in NO_DROPOUT for a in ("--set", s)),
               "--out", str(out), "--data-dir", str(tmp_path / "data"), "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("test accuracy") == 1  # one report, from rank 0

    written = list(out.glob("runs/*/result.json"))
    assert len(written) == 1, written  # rank 0 alone writes
    ddp = json.loads(written[0].read_text())
    assert ddp["world_size"] == 2 and ddp["steps"] == STEPS
    # The global batch, not per process: 2 processes x 2 accumulated micro-batches of 4.
    assert ddp["config"]["train"]["batch_size"] == GLOBAL_BATCH and ddp["config"]["train"]["grad_accum"] == 2
    assert ddp["test_n"] == SMOKE_DATA.num_test  # every test example, counted once over both ranks
    assert len(list((out / "tb" / ddp["run_id"]).glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (out / "runs" / ddp["run_id"]).iterdir()) == ["checkpoint.pt", "result.json"]

    # Each rank took half of every global batch: the same model as one process taking it whole.
    one = train_here(tmp_path, "one")
    assert one["world_size"] == 1 and one["config"]["train"]["grad_accum"] == 1
    assert ddp["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)
    assert [h["val_loss"] for h in ddp["history"]] == pytest.approx([h["val_loss"] for h in one["history"]], rel=1e-5)
    assert ddp["test_acc"] == one["test_acc"]


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    whole = train_here(tmp_path, "whole")
    accumulated = train_here(tmp_path, "accum", "train.grad_accum=4")
    assert accumulated["config"]["train"]["grad_accum"] == 4
    assert accumulated["test_loss"] == pytest.approx(whole["test_loss"], rel=1e-5)
    assert [h["val_loss"] for h in accumulated["history"]] == pytest.approx(
        [h["val_loss"] for h in whole["history"]], rel=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        train_here(tmp_path, "bad", "train.grad_accum=3")


def test_auto_grad_accum_picks_the_first_fitting_split_and_leaves_no_trace(tmp_path, monkeypatch):
    """``--grad-accum auto`` with a budget that the whole batch (8) and halves (4) exceed: the probe
    settles on 4 micro-batches of 2, and the run equals one given ``grad_accum=4`` (the probe steps
    change neither the weights nor the random streams)."""
    probes = []

    def fake_peak(step, device):  # what the probe measures: over budget twice, then within it
        step()
        probes.append(1)
        return 10**12 if len(probes) <= 2 else 0

    monkeypatch.setattr(engine, "step_peak_bytes", fake_peak)
    TASKS.get("listops")().prepare(tmp_path / "data", SMOKE_DATA)
    auto = engine.train(spec("train.grad_accum=0", "model.dropout=0.1"), tmp_path / "auto", tmp_path / "data",
                        progress=False, device="cpu", memory_budget_gb=1.0)
    assert len(probes) == 3 and auto["grad_accum"] == 4
    fixed = train_here(tmp_path, "fixed", "train.grad_accum=4", "model.dropout=0.1")
    assert auto["test_loss"] == pytest.approx(fixed["test_loss"], rel=1e-6)
    assert [h["val_loss"] for h in auto["history"]] == pytest.approx([h["val_loss"] for h in fixed["history"]], rel=1e-6)


def test_grad_accum_flag_takes_auto_and_rejects_zero():
    from lra_dtn.app.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["train", "--task", "listops", "--model", "transformer", "--grad-accum", "auto"]).grad_accum == 0
    with pytest.raises(SystemExit):
        parse(["train", "--task", "listops", "--model", "transformer", "--grad-accum", "0"])


@pytest.mark.parametrize("budget", ["0", "-1", "lots"])
def test_memory_budget_must_be_positive(budget):
    from lra_dtn.app.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--task", "listops", "--model", "transformer", "--grad-accum", "auto",
                                   "--memory-budget", budget])


def test_memory_budget_without_auto_is_an_error_not_ignored():
    from lra_dtn.app.cli import build_parser
    from lra_dtn.app.options import run_spec

    def spec_of(argv: list[str]):
        return run_spec(build_parser().parse_args(argv), "listops", "transformer", "ln", 0)

    base = ["train", "--task", "listops", "--model", "transformer", "--memory-budget", "2"]
    with pytest.raises(ValueError, match="only with --grad-accum auto"):
        spec_of(base)
    with pytest.raises(ValueError, match="only with --grad-accum auto"):
        spec_of([*base, "--grad-accum", "4"])
    with pytest.raises(ValueError, match="only with --grad-accum auto"):  # the last word on the field counts
        spec_of([*base, "--grad-accum", "auto", "--set", "train.grad_accum=2"])
    auto = spec_of([*base, "--grad-accum", "auto"])
    assert auto.train.grad_accum == 0 and auto == spec_of([*base, "--set", "train.grad_accum=0"])


def test_bf16_autocast_trains_on_cpu(tmp_path):
    fp32 = train_here(tmp_path, "fp32", "train.steps=3")
    bf16 = train_here(tmp_path, "bf16", "train.steps=3", "train.precision=bf16")
    assert bf16["config"]["train"]["precision"] == "bf16" and bf16["run_id"] != fp32["run_id"]
    assert math.isfinite(bf16["test_loss"]) and bf16["test_n"] == SMOKE_DATA.num_test
    # bf16 keeps ~3 significant digits: close to fp32 after 3 steps, but not bit-equal.
    assert bf16["test_loss"] == pytest.approx(fp32["test_loss"], rel=0.05)


@pytest.mark.skipif("text" not in TASKS, reason="needs a task whose data is missing")
def test_sweep_under_torchrun_checks_data_once_and_writes_from_rank_0(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "run_lra.py", "sweep", "--tasks", "listops,text", "--models", "transformer", "--norms", "ln,rms",
               "--seeds", "0", "--preset", "smoke", "--max-steps", "2", "--out", str(out),
               "--data-dir", str(tmp_path / "data"), "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("[sweep] 4 runs in the grid") == 1  # rank 0 alone reports
    assert done.stdout.count("text: data missing") == 1
    written = [json.loads(p.read_text()) for p in out.glob("runs/*/result.json")]
    assert sorted(r["norm"] for r in written) == ["ln", "rms"] and all(r["world_size"] == 2 for r in written)
    assert all(r["test_n"] == SMOKE_DATA.num_test for r in written)
    marker = [p.name for p in (out / "missing").iterdir()]  # --max-steps 2 is a settings variant of smoke
    assert len(marker) == 1 and marker[0].startswith("text-smoke-x") and written[0]["run_id"].endswith(marker[0][10:-5])
    table = (out / "results.md").read_text()
    assert "- **text**" in table and "| transformer | Δ rms − ln |" in table
