"""One run: training, evaluation, and the run's result JSON.

One run = one :class:`~lra_dtn.config.RunSpec`. Its files live in ``OUT/runs/<run_id>/``
(``checkpoint.pt``: :mod:`lra_dtn.app.checkpoint`; ``result.json``) and its TensorBoard scalars in
``OUT/tb/<run_id>/``; the tables are the commands' job (:mod:`lra_dtn.app.tables`). The
batch of every step is a pure function of (seed, step) and the checkpoint holds the RNG states, so
a run resumed from its last checkpoint ends with the same numbers as one never interrupted.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lra_dtn import distributed
from lra_dtn.app import artifacts
from lra_dtn.app.checkpoint import (CHECKPOINT_FILE, clear_run, finished_result, load_checkpoint, restore_rng_state,
                                    rng_state, run_dir, save_checkpoint)
from lra_dtn.app.provenance import git_commit, versions
from lra_dtn.config import RunSpec
from lra_dtn.data import Batch, collate, eval_order, train_indices
from lra_dtn.dtn import DynamicTokenNorm
from lra_dtn.memory import (GIB, choose_grad_accum, default_budget_bytes, peak_memory_mb, reset_peak_memory,
                            step_peak_bytes)
from lra_dtn.optim import build_optimizer, learning_rate
from models import build_model
from tasks import TASKS

def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast, or nothing for fp32 (``TrainConfig`` admits only ``config.PRECISIONS``)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def norm_summary(model: nn.Module) -> dict[str, dict[str, list]]:
    """The learned DTN parameters of every norm slot, for the gates/windows figure."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, DynamicTokenNorm):  # dtn and dtn_var
            found[name] = {
                "gate_mean": None if module.gate_mean is None else torch.sigmoid(module.gate_mean).tolist(),
                "gate_var": torch.sigmoid(module.gate_var).tolist(),
                "pos_weight": module.pos_proj.weight.tolist(),
            }
    return found


def loss_and_correct(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(*batch.inputs()).float()
    return F.cross_entropy(logits, batch.labels), (logits.argmax(-1) == batch.labels).sum()


def auto_grad_accum(model: nn.Module, optimizer: torch.optim.Optimizer, dataset: Any, batch: int, precision: str,
                    mask_zero_tokens: bool, device: torch.device, budget_gb: float | None) -> tuple[int, int, int]:
    """``--grad-accum auto``: the fewest micro-batches per step whose forward + backward on the split's
    longest examples fits the budget (see :mod:`lra_dtn.memory`); returns (micro-batches, peak, budget)
    in bytes. The probe steps leave no trace: gradients are dropped and the random streams restored.
    Adam's two moment buffers, not allocated before the first step, are added to the probed peak."""
    budget = int(budget_gb * GIB) if budget_gb else default_budget_bytes(device)
    longest = np.argsort(np.asarray(dataset["length"]), kind="stable")[::-1]
    moments = 0 if optimizer.state else 2 * sum(p.numel() * p.element_size() for p in model.parameters())

    def peak(micro: int) -> int:
        examples = collate(dataset, longest[:micro], mask_zero_tokens).to(device)

        def step() -> None:
            with autocast(precision, device):
                loss, _ = loss_and_correct(model, examples)
            loss.backward()

        try:
            return step_peak_bytes(step, device) + moments
        finally:
            model.zero_grad(set_to_none=True)

    streams = rng_state(device)
    try:
        accum, used = choose_grad_accum(batch, peak, budget)
    finally:
        restore_rng_state(streams, device)
    return accum, used, budget


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Any, batch_size: int, ctx: distributed.DistContext, precision: str,
             mask_zero_tokens: bool) -> dict[str, float]:
    """Accuracy and loss on every example of a split (no dropped remainder), sharded over ranks."""
    was_training = model.training
    model.eval()
    order = eval_order(np.asarray(dataset["length"]))
    shard = np.array_split(order, ctx.world_size)[ctx.rank]
    loss_sum = correct = 0.0
    for start in range(0, len(shard), batch_size):
        batch = collate(dataset, shard[start : start + batch_size], mask_zero_tokens).to(ctx.device)
        with autocast(precision, ctx.device):
            loss, right = loss_and_correct(model, batch)
        loss_sum += loss.item() * len(batch)
        correct += right.item()
    loss_sum, correct, count = distributed.all_reduce_sum(ctx, [loss_sum, correct, float(len(shard))])
    model.train(was_training)
    return {"acc": correct / count, "loss": loss_sum / count, "n": int(count)}


def train(spec: RunSpec, out: Path, data_dir: Path, cache_dir: Path | None = None, resume: bool = False,
          overwrite: bool = False, device: str = "auto", progress: bool = True,
          memory_budget_gb: float | None = None) -> dict[str, Any]:
    """Train one run to ``spec.train.steps``, evaluate on test, write its JSON; return the result.

    ``resume``: continue from the run's checkpoint (or return its result if it already finished).
    ``overwrite``: start afresh even if the run folder holds an earlier checkpoint or result.
    ``memory_budget_gb``: what ``train.grad_accum=0`` (auto) fits a step into (default: 90 % of free)."""
    ctx = distributed.init(device)
    folder = run_dir(out, spec)
    ckpt_path, result_path = folder / CHECKPOINT_FILE, folder / artifacts.RESULT_FILE
    done = finished_result(folder, resume, overwrite)
    if done is not None:
        return done

    cfg = spec.train
    if cfg.batch_size % (ctx.world_size * max(cfg.grad_accum, 1)):
        raise ValueError(f"batch size {cfg.batch_size} must be divisible by processes x grad_accum = "
                         f"{ctx.world_size} x {cfg.grad_accum} (grad_accum 0 = auto)")
    task = TASKS.get(spec.task)()
    cache_dir = Path(cache_dir) if cache_dir else Path(data_dir) / ".lra_dtn_cache"
    if not ctx.is_main:  # rank 0 tokenizes once (the command prepared the files); the others read its cache
        distributed.barrier(ctx)
    splits = task.load(Path(data_dir), spec.data, cache_dir)
    if ctx.is_main:
        distributed.barrier(ctx)
    mask_zero = spec.data.mask_zero_tokens

    reset_peak_memory(ctx.device)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model_name, spec.model, spec.norm, seed=spec.seed, dual=task.dual).to(ctx.device)
    optimizer = build_optimizer(model, cfg)
    state = {"step": 0, "train_seconds": 0.0, "history": []}
    if overwrite and ctx.is_main:
        clear_run(out, spec)
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, ctx.device)
        if ckpt["spec"] != spec.to_dict():
            raise ValueError(f"{ckpt_path} was written by a different config; use a new --out, or delete "
                             f"{folder} (train: --overwrite) to start this run afresh")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        restore_rng_state(ckpt["rng"][ctx.rank % len(ckpt["rng"])], ctx.device)
        state = ckpt["state"]
    else:
        torch.manual_seed(spec.seed * 1000 + ctx.rank)  # dropout stream, distinct per rank
    num_params = sum(p.numel() for p in model.parameters())
    per_rank, accum = cfg.batch_size // ctx.world_size, cfg.grad_accum
    if accum == 0 and state.get("grad_accum"):  # resumed: keep the count the run started with (same dropout draws)
        accum = state["grad_accum"]
    elif accum == 0:
        accum, used, budget = auto_grad_accum(model, optimizer, splits["train"], per_rank, cfg.precision, mask_zero,
                                              ctx.device, memory_budget_gb)
        if ctx.is_main:
            print(f"[{spec.run_id}] --grad-accum auto: {accum} micro-batch(es) of {per_rank // accum} per process "
                  f"(probed peak {used / GIB:.2f} GiB, budget {budget / GIB:.2f} GiB)", flush=True)
    state["grad_accum"] = accum
    ddp = DistributedDataParallel(model) if ctx.group else model

    writer = None
    if ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(Path(out) / "tb" / spec.run_id), purge_step=state["step"] or None)
    bar = None
    if ctx.is_main and progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=state["step"], desc=spec.run_id, dynamic_ncols=True, mininterval=1.0)

    def peak() -> tuple[float, str]:
        """MiB and kind of the peak over every process that worked on this run (a resumed one starts
        from zero)."""
        mb, kind = peak_memory_mb(ctx.device)
        return max(mb, state.get("peak_mem_mb", 0.0)), kind

    def checkpoint() -> None:
        state["peak_mem_mb"] = peak()[0]
        mine = rng_state(ctx.device)
        rngs = [mine] * ctx.world_size
        if ctx.group:
            torch.distributed.all_gather_object(rngs, mine)
        if ctx.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            save_checkpoint(ckpt_path, {"spec": spec.to_dict(), "model": model.state_dict(),
                                        "optimizer": optimizer.state_dict(), "rng": rngs, "state": state})

    train_set = splits["train"]
    micro = per_rank // accum
    ddp.train()
    while state["step"] < cfg.steps:
        step = state["step"]
        started = time.perf_counter()
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = train_indices(step, len(train_set), cfg.batch_size, spec.seed)
        mine = indices[ctx.rank * micro * accum : (ctx.rank + 1) * micro * accum]
        loss_sum = correct = 0.0
        for k in range(accum):
            batch = collate(train_set, mine[k * micro : (k + 1) * micro], mask_zero).to(ctx.device)
            sync = ddp.no_sync() if ctx.group and k < accum - 1 else contextlib.nullcontext()
            with sync, autocast(cfg.precision, ctx.device):
                loss, right = loss_and_correct(ddp, batch)
                (loss / accum).backward()
            loss_sum += loss.item() / accum
            correct += right.item()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"{spec.run_id}: loss is {loss_sum} at step {step}")
        state["train_seconds"] += time.perf_counter() - started
        state["step"] = step = step + 1
        if writer is not None:
            writer.add_scalar("train/loss", loss_sum, step)
            writer.add_scalar("train/acc", correct / (micro * accum), step)
            writer.add_scalar("train/lr", lr, step)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", acc=f"{correct / (micro * accum):.2f}",
                            sps=f"{step / max(state['train_seconds'], 1e-9):.1f}", refresh=False)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val = evaluate(model, splits["val"], micro * accum, ctx, cfg.precision, mask_zero)
            state["history"].append({"step": step, "val_acc": val["acc"], "val_loss": val["loss"]})
            if writer is not None:
                writer.add_scalar("val/acc", val["acc"], step)
                writer.add_scalar("val/loss", val["loss"], step)
            if ctx.is_main:
                line = f"[{spec.run_id}] step {step}: val acc {val['acc']:.4f} loss {val['loss']:.4f}"
                bar.write(line) if bar is not None else print(line, flush=True)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            checkpoint()
    if bar is not None:
        bar.close()

    test = evaluate(model, splits["test"], micro * accum, ctx, cfg.precision, mask_zero)
    memory, memory_kind = peak()
    last_val = state["history"][-1] if state["history"] else {}
    result = {
        "run_id": spec.run_id, "task": spec.task, "model": spec.model_name, "norm": spec.norm,
        "preset": spec.preset, "seed": spec.seed, "config": spec.to_dict(), "data": task.describe(spec.data, spec.model),
        "val_acc": last_val.get("val_acc"), "test_acc": test["acc"], "test_loss": test["loss"], "test_n": test["n"],
        "steps": state["step"], "sec_per_step": state["train_seconds"] / max(state["step"], 1),
        "train_seconds": state["train_seconds"], "peak_mem_mb": memory, "peak_mem_kind": memory_kind,
        "params": num_params, "device": str(ctx.device), "world_size": ctx.world_size, "grad_accum": accum,
        "history": state["history"], "norm_params": norm_summary(model), "versions": versions(),
        "git_commit": git_commit(),
    }
    if writer is not None:
        writer.add_scalar("test/acc", test["acc"], state["step"])
        writer.close()
    if ctx.is_main:
        artifacts.write_json(result_path, result)
    distributed.barrier(ctx)
    return result
