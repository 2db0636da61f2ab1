"""The training engine: learning, exact resume, reproducibility, schedules, optimizer groups, CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lra_dtn.app import engine
from lra_dtn.app.checkpoint import RunExistsError
from lra_dtn.app.cli import main
from lra_dtn.config import TrainConfig
from lra_dtn.data import collate, train_indices
from lra_dtn.optim import build_optimizer, learning_rate, param_groups
from lra_dtn.app.specs import make_spec
from models import build_model
from tasks import TASKS

SETTINGS = ["train.steps=8", "train.eval_every=4", "train.checkpoint_every=4", "train.batch_size=8",
            "data.num_train=64", "data.num_val=16", "data.num_test=24"]


def smoke_spec(*extra: str, norm: str = "ln"):
    return make_spec("listops", "transformer", norm, "smoke", seed=0, settings=SETTINGS + list(extra))


def test_loss_goes_down_on_a_tiny_task(tmp_path):
    spec = smoke_spec()
    TASKS.get("listops")().prepare(tmp_path / "data", spec.data)
    splits = TASKS.get("listops")().load(tmp_path / "data", spec.data, tmp_path / "cache")
    batch = collate(splits["train"], train_indices(0, len(splits["train"]), 16, 0))
    torch.manual_seed(0)
    model = build_model("transformer", spec.model, "ln")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(*batch.inputs()), batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def run(tmp_path, name, **kwargs):
    TASKS.get("listops")().prepare(tmp_path / "data", smoke_spec().data)
    return engine.train(smoke_spec(), tmp_path / name, tmp_path / "data", tmp_path / "cache", progress=False,
                        **kwargs)


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    full = run(tmp_path, "full")
    saved = engine.save_checkpoint

    def crash_after_first_save(path, state):
        saved(path, state)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(engine, "save_checkpoint", crash_after_first_save)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "cut")
    assert not (tmp_path / "cut" / "runs" / full["run_id"] / "result.json").exists()
    monkeypatch.setattr(engine, "save_checkpoint", saved)
    with pytest.raises(RunExistsError, match="--resume"):
        run(tmp_path, "cut")
    resumed = run(tmp_path, "cut", resume=True)
    for key in ("test_acc", "test_loss", "val_acc", "history", "steps"):
        assert resumed[key] == full[key], key
    a = torch.load(tmp_path / "full" / "runs" / full["run_id"] / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "runs" / full["run_id"] / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A finished run asked to resume is reported, not retrained.
    assert run(tmp_path, "cut", resume=True)["test_loss"] == full["test_loss"]


def test_a_run_writes_its_json_and_no_table(tmp_path):
    result = run(tmp_path, "out")
    saved = json.loads((tmp_path / "out" / "runs" / result["run_id"] / "result.json").read_text())
    assert saved["test_n"] == 24 and saved["steps"] == 8 and len(saved["history"]) == 2
    assert saved["config"]["train"]["steps"] == 8 and saved["params"] > 0 and saved["sec_per_step"] > 0
    assert "torch" in saved["versions"]
    assert not (tmp_path / "out" / "results.csv").exists()  # tables are the commands' job (train, sweep, table)
    assert list((tmp_path / "out" / "tb" / result["run_id"]).glob("events.out.tfevents.*"))
    assert run(tmp_path, "again")["test_loss"] == result["test_loss"]  # same seed, same numbers


def test_learning_rate_schedules_match_the_official_formulas():
    rsqrt = TrainConfig(batch_size=32, steps=5000, lr=0.05, schedule="rsqrt", warmup=1000, weight_decay=0.1)
    assert learning_rate(0, rsqrt) == 0.0
    assert learning_rate(500, rsqrt) == pytest.approx(0.05 * 0.5 / math.sqrt(1000))
    assert learning_rate(1000, rsqrt) == pytest.approx(1.5811e-3, rel=1e-4)  # spec: peak 0.05/sqrt(1000)
    assert learning_rate(4000, rsqrt) == pytest.approx(0.05 / math.sqrt(4000))
    retrieval = TrainConfig(batch_size=32, steps=5000, lr=0.05, schedule="rsqrt", warmup=8000, weight_decay=0.1)
    assert learning_rate(5000, retrieval) == pytest.approx(0.05 * 5000 / 8000 / math.sqrt(8000))  # spec §6: ≈ 3.49e-4, warmup never ends
    cosine = TrainConfig(batch_size=256, steps=35000, lr=5e-4, schedule="cosine", warmup=175, weight_decay=0.0)
    assert learning_rate(175, cosine) == pytest.approx(5e-4)
    assert learning_rate(175 + 17500, cosine) == pytest.approx(2.5e-4)
    assert learning_rate(35000, cosine) == pytest.approx(5e-4 * 0.5 * (1 + math.cos(math.pi * 34825 / 35000)))
    assert learning_rate(35000, cosine) < 1e-7  # the last step ends near 0


def test_norm_parameters_take_no_weight_decay():
    spec = smoke_spec()
    model = build_model("transformer", spec.model, "ln")
    decay, no_decay = param_groups(model, 0.1)
    num_norms = 2 * spec.model.num_layers + 1
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 2 * num_norms
    assert decay["weight_decay"] == 0.1
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    optimizer = build_optimizer(model, spec.train)
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-9


def test_cli_rejects_unknown_names_with_the_valid_list(capsys):
    with pytest.raises(SystemExit):
        main(["--task", "listops", "--model", "transformer", "--norm", "nope"])
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and "'ln'" in err
    with pytest.raises(SystemExit, match="unknown train setting.*valid: batch_size"):
        main(["--task", "listops", "--model", "transformer", "--set", "train.nope=1"])


def test_cli_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for option in ("--preset", "--data-dir", "--out", "--seed", "--max-steps", "--batch-size", "--resume"):
        assert option in text


def test_cli_generate_writes_the_official_layout(tmp_path, capsys):
    main(["generate", "listops", "--out", str(tmp_path / "gen"), "--set", "num_train=30", "--set", "num_val=5",
          "--set", "num_test=5", "--set", "min_length=5", "--set", "max_length=40", "--set", "max_depth=4",
          "--workers", "1"])
    lines = (tmp_path / "gen" / "basic_train.tsv").read_text().splitlines()
    assert lines[0] == "Source\tTarget" and len(lines) == 31
    assert "wrote" in capsys.readouterr().out


def test_cli_generate_rejects_a_setting_without_a_value(tmp_path):
    with pytest.raises(SystemExit, match="expected NAME=VALUE"):
        main(["generate", "listops", "--out", str(tmp_path / "gen"), "--set", "num_train"])
    assert not (tmp_path / "gen").exists()


def test_a_damaged_checkpoint_is_named_and_the_resume_refused_cleanly(tmp_path):
    """A cut-short or foreign checkpoint.pt: a message naming it and what to delete, not torch's error."""
    spec = smoke_spec()
    path = tmp_path / "out" / "runs" / spec.run_id / "checkpoint.pt"
    path.parent.mkdir(parents=True)
    for content in (b"garbage", None):
        if content is None:
            torch.save({"a": 1}, path)
        else:
            path.write_bytes(content)
        with pytest.raises(SystemExit, match=f"error: {path}: not .*checkpoint.*delete {path.parent}"):
            main(["--task", "listops", "--model", "transformer", "--preset", "smoke", "--resume",
                  "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data"), "--no-progress",
                  *(a for s in SETTINGS for a in ("--set", s))])


def test_cli_refuses_bad_values_naming_the_option(tmp_path, capsys):
    base = ["--task", "listops", "--model", "transformer", "--out", str(tmp_path / "out")]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for args, complaint in ((["--out", str(a_file)], "is a file, not a folder"),
                            (["--data-dir", str(a_file)], "is a file, not a folder"),
                            (["--batch-size", "0"], "expected an integer >= 1"),
                            (["--max-steps", "-3"], "expected an integer >= 1"),
                            (["--seed", "-1"], "expected an integer >= 0"),
                            (["--resume", "--overwrite"], "not allowed with argument")):
        with pytest.raises(SystemExit):
            main([*base, *args])
        assert complaint in capsys.readouterr().err, args
    for setting, complaint in (("train.lr=abc", r"--set train.lr=abc: could not convert"),
                               ("train.eval_every=0", r"TrainConfig.eval_every must be positive"),
                               ("train.betas=0.9", r"TrainConfig.betas must be two numbers"),
                               ("train.schedule=foo", r"TrainConfig.schedule must be one of rsqrt, cosine"),
                               ("model.pooling=max", r"ModelConfig.pooling must be one of cls, mean"),
                               ("model.official_quirks=maybe", r"official_quirks=maybe: expected true or false")):
        with pytest.raises(SystemExit, match=complaint):
            main([*base, "--set", setting])
    assert not (tmp_path / "out").exists()  # all refused before any training
    with pytest.raises(SystemExit, match="no such folder"):
        main(["table", "--out", str(tmp_path / "typo")])
    assert not (tmp_path / "typo").exists()


def test_ctrl_c_says_what_is_kept_and_how_to_go_on(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "train", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        # the train command prepares (generates) the data before training: keep that small and inside tmp_path
        main(["--task", "listops", "--model", "transformer", "--preset", "smoke", "--out", str(tmp_path),
              "--data-dir", str(tmp_path / "data")])
    assert exit_info.value.code == 130
    assert "interrupted: the last checkpoint is kept; the same command with --resume" in capsys.readouterr().err


def test_set_values_take_the_field_type():
    """``--set`` text becomes the field's type: int, float, optional (``none``), bool, a float tuple, str."""
    from lra_dtn.app.specs import apply_settings
    from tasks.pathfinder import PathfinderData

    train = apply_settings(smoke_spec().train, {"steps": "7", "lr": "1e-3", "grad_clip": "none", "betas": "0.9,0.95",
                                                "precision": "bf16"}, "train")
    assert (train.steps, train.lr, train.grad_clip, train.betas, train.precision) == (7, 1e-3, None, (0.9, 0.95), "bf16")
    assert apply_settings(train, {"grad_clip": "0.5"}, "train").grad_clip == 0.5
    data = apply_settings(PathfinderData(), {"distractors": "0", "mask_zero_tokens": "true"}, "data")
    assert data.distractors == 0 and data.distractors is not False and data.mask_zero_tokens is True
    for name, text in (("steps", "none"), ("steps", "1.5"), ("grad_clip", "big")):
        with pytest.raises(ValueError, match=f"--set train.{name}={text}"):
            apply_settings(train, {name: text}, "train")
