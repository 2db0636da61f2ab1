"""A run's folder ``OUT/runs/<run_id>/``: what may be in it before training (resume, overwrite or
refuse), and the checkpoint that lets a run go on where it stopped (model, optimizer, random streams)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from lra_dtn.app import artifacts
from lra_dtn.config import RunSpec
from lra_dtn.workdirs import atomic_file

CHECKPOINT_FILE = "checkpoint.pt"


class RunExistsError(RuntimeError):
    """A run folder already holds a checkpoint or result and neither resume nor overwrite was asked."""


def run_dir(out: Path, spec: RunSpec) -> Path:
    return Path(out) / "runs" / spec.run_id


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file, then rename: a kill mid-write keeps the previous one."""
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


CHECKPOINT_KEYS = ("spec", "model", "optimizer", "rng", "state")


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`; anything else (a damaged or foreign file) raises
    :class:`~lra_dtn.app.artifacts.RunFileError` naming the file and what to do, instead of torch's unpickling error."""
    what_to_do = f"delete {path.parent} to start this run afresh"
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as err:  # noqa: BLE001 (zip, pickle and EOF errors alike mean "not a checkpoint")
        raise artifacts.RunFileError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err}); {what_to_do}") from err
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or key not in ckpt]
    if missing:
        raise artifacts.RunFileError(f"{path}: not an lra-dtn checkpoint (no {', '.join(missing)}); {what_to_do}")
    return ckpt


def finished_result(folder: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """What a run folder's files mean before training: the run's result when ``resume`` finds it finished
    (nothing to train), else None. Files without ``resume`` or ``overwrite`` raise :class:`RunExistsError`."""
    ckpt_path, result_path = folder / CHECKPOINT_FILE, folder / artifacts.RESULT_FILE
    if not (resume or overwrite) and (ckpt_path.exists() or result_path.exists()):
        raise RunExistsError(f"{folder} already holds a run; pass --resume to continue it or --overwrite to restart")
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: pass one")
    return artifacts.read_result(result_path) if resume and result_path.exists() else None


def clear_run(out: Path, spec: RunSpec) -> None:
    """``--overwrite``: the run's checkpoint, result and TensorBoard scalars go before it starts afresh."""
    folder = run_dir(out, spec)
    (folder / CHECKPOINT_FILE).unlink(missing_ok=True)
    (folder / artifacts.RESULT_FILE).unlink(missing_ok=True)
    shutil.rmtree(Path(out) / "tb" / spec.run_id, ignore_errors=True)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The random streams a training step draws from (dropout): the CPU generator, and on a GPU the
    device's own, which is where dropout masks are drawn there."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Inverse of :func:`rng_state`. A checkpoint loaded onto a GPU brings the states there; the
    generators take them as CPU byte tensors."""
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
