"""DTN against LayerNorm: the norm alone and one training step of 4-layer encoders, on CPU or GPU.

    python -m benchmarks.norms                          # T = 1024, 2048, 4096; B=8, C=128, H=4
    python -m benchmarks.norms --lengths 1024 --rounds 5
    python -m benchmarks.norms --device cuda --batch 32 --lengths 2000 --precision bf16   # a GPU
    python -m benchmarks.norms --traffic                # bytes per token, LN vs each DTN path, no GPU needed
    python -m benchmarks.norms --small-model --threads 1  # the cpu-preset ListOps Transformer: DTN's fixed cost
    python -m benchmarks.norms --grid-prior --threads 1 --rounds 5   # DTN's 2-D prior on the image tasks

Kernels: ``init`` is DTN's local init (each head a Gaussian window, ~15 offsets of support); ``wide``
gives every head a centred Gaussian whose effective support (the offsets DTN convolves over,
``lra_dtn.dtn.kernel.TRUNCATION``) is 257 offsets, std ~17 tokens.

Encoders are the size of ``benchmarks.encoders`` (emb = qkv = 128, mlp 512, 4 heads, 4 layers, CLS,
dropout 0.1, attention dropout 0 so the Transformer runs PyTorch's fused attention), with ``T`` tokens
plus CLS. A training step is forward, backward and an AdamW step on random labels, every sequence
padded to a random length in ``[T/2, T]``. BigBird is measured once ``models.MODELS`` has it.

Time: LayerNorm, DTN at init and DTN wide run in turn for ``--rounds`` rounds and each keeps its
fastest, so a busy machine slows all of them alike; CPU time of the process is reported beside wall
time. On a machine shared with other jobs both are unreliable for DTN at 2 threads (its many short
parallel loops each wait for a descheduled thread): measure on an idle machine, or with ``--threads 1``.
Memory: peak resident set over two training steps, in a fresh process per cell, minus the resident
set before them. On a GPU: CUDA time (synchronised) and the allocator's peak over two steps.

Traffic (``--traffic``): what one forward + backward of the norm alone reads and writes per token at
the official ListOps and Text shapes (batch, length + CLS, width and heads from ``tasks``' official
configs), float32, DTN at its local init. Eager paths are counted op by op (:mod:`benchmarks.traffic`
gives the rule) at ``--traffic-batch`` sequences, one of them half padded: bytes per token do not depend
on the batch (the batch-free kernel tables are a few KiB), so this is the official batch's count per
token. A fused path, which the dispatcher sees as one op, reports what its kernels load and store
(``lra_dtn.dtn.fused.traffic_bytes``), for the local init's support and for a 255-offset kernel.

Small model (``--small-model``): where DTN's fixed cost per call shows, the ``cpu`` preset ListOps
Transformer (``tasks``' cpu config: 2 layers, width 64, 4 heads, batch 32, generated sequences of up to
100 tokens + CLS, each batch padded to its longest): one norm call forward + backward at the longest
shape, and one training step (forward, backward, the project's AdamW step), LN, DTN (``auto``: the native
C kernels on CPU) and DTN's eager path (``conv``, what ``auto`` took before them) in turn, the fastest of
``--rounds`` (at least 5) rounds of 8 steps over the same 8 batches. On a shared machine use
``--threads 1``: CPU time on one thread is the stable number. Target (issue 11): step DTN/LN <= 1.3.

``--dtn-method`` sets the path of every DTN in the norm and step rows (default ``auto``; ``conv`` measures
the eager path).

Targets (the issue): step-time ratio DTN/LN <= 1.10 (Transformer) and <= 1.30 (BigBird) at init, <= 1.5
and <= 2.0 with the wide kernel; peak step memory ratio <= 1.25.

``--grid-prior`` (issue 13) measures instead the training step of the Image and Pathfinder official
Transformers (their own configs, attention dropout 0 as above, ``--batch`` images) with LN, DTN with the
1-D prior (``model.norm_prior=1d``) and DTN with the 2-D prior (the default on these tasks), at init.
Target: DTN-2D/LN <= DTN-1D/LN + 0.05.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from benchmarks.encoders import RETRIEVAL_SIZE
from lra_dtn.config import PRECISIONS, ModelConfig
from benchmarks.traffic import count_traffic
from lra_dtn.config import Preset
from lra_dtn.dtn import TRUNCATION, DynamicTokenNorm
from lra_dtn.dtn.cpu import make_plan
from lra_dtn.dtn.fused import support_width
from lra_dtn.norms import build_norm
from lra_dtn.optim import build_optimizer
from models import MODELS, build_model
from tasks import TASKS

BATCH, CHANNELS, HEADS = 8, 128, 4
DEVICE = torch.device("cpu")  # --device
PRECISION = "fp32"  # --precision: bf16 autocasts the training steps
WIDE_HALF_WIDTH = 128
DTN_METHOD = "auto"  # --dtn-method: the path every 1-D DTN of the norm and step rows takes
NORMS = {"ln": ("ln", None), "dtn-init": ("dtn", None), "dtn-wide": ("dtn", WIDE_HALF_WIDTH)}


def with_method(module: torch.nn.Module, method: str | None) -> torch.nn.Module:
    """``module`` with every 1-D DTN in it set to ``method`` (``None``: unchanged)."""
    for norm in module.modules():
        if method and isinstance(norm, DynamicTokenNorm) and norm.grid is None:
            norm.method = method
    return module


def widen(module: torch.nn.Module, length: int, half_width: int = WIDE_HALF_WIDTH) -> None:
    """Give every DTN head the centred Gaussian whose support is ``2 * half_width + 1`` offsets."""
    for norm in module.modules():
        if isinstance(norm, DynamicTokenNorm):
            with torch.no_grad():
                norm.pos_proj.weight[:, 0] = 0.0
                norm.pos_proj.weight[:, 1] = -math.log(2 * length / TRUNCATION) / half_width**2


def describe_kernels(length: int) -> str:
    norm = DynamicTokenNorm(CHANNELS, HEADS)
    init = make_plan(norm.pos_proj.weight, length, "auto", torch.float32)
    widen(norm, length)
    wide = make_plan(norm.pos_proj.weight, length, "auto", torch.float32)
    return f"init: {init.width} offsets, {init.method}; wide: {wide.width} offsets, {wide.method}"


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def fastest(jobs: dict[str, callable], rounds: int) -> dict[str, tuple[float, float]]:
    """Run every job once to warm up, then ``rounds`` times in turn: fastest (wall, CPU) seconds."""
    best = {name: (math.inf, math.inf) for name in jobs}
    for step in range(rounds + 1):
        for name, job in jobs.items():
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            job()
            sync()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if step:
                best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def norm_jobs(length: int) -> dict[str, callable]:
    torch.manual_seed(0)
    x = torch.randn(BATCH, length, CHANNELS, device=DEVICE, requires_grad=True)
    grad = torch.randn(BATCH, length, CHANNELS, device=DEVICE)
    mask = (torch.arange(length)[None] < torch.randint(length // 2, length + 1, (BATCH,))[:, None]).to(DEVICE)
    jobs = {}
    for label, (name, half_width) in NORMS.items():
        norm = with_method(build_norm(name, CHANNELS, HEADS).to(DEVICE), DTN_METHOD)
        if half_width:
            widen(norm, length)
        jobs[label] = lambda norm=norm: norm(x, mask).backward(grad)
    return jobs


def model_config(length: int) -> ModelConfig:
    shape = dict(RETRIEVAL_SIZE, emb_dim=CHANNELS, qkv_dim=CHANNELS, mlp_dim=4 * CHANNELS, num_heads=HEADS)
    return ModelConfig(max_len=length, dropout=0.1, attn_dropout=0.0, **shape)


def training_step(model_name: str, label: str, length: int):
    """A closure running one training step of ``model_name`` with the norm ``label``."""
    torch.manual_seed(0)
    name, half_width = NORMS[label]
    cfg = model_config(length)
    model = with_method(build_model(model_name, cfg, name).to(DEVICE).train(), DTN_METHOD)
    if half_width:
        widen(model, length + 1)  # + CLS
    mask = (torch.arange(length)[None] < torch.randint(length // 2, length + 1, (BATCH,))[:, None]).to(DEVICE)
    return step_closure(model, cfg, mask)


def step_closure(model: torch.nn.Module, cfg: ModelConfig, mask: torch.Tensor):
    """One training step of ``model`` on random tokens and labels, real where ``mask`` is."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(1, cfg.vocab_size, mask.shape, device=DEVICE)
    labels = torch.randint(0, cfg.num_classes, (BATCH,), device=DEVICE)
    autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=PRECISION == "bf16")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = model(ids, mask)
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()

    return step


def step_memory(model_name: str, label: str, length: int) -> float:
    """MiB: peak resident set over two training steps minus the resident set before them (model, data
    and everything imported): activations, gradients, optimizer state and any kept buffers."""
    step = training_step(model_name, label, length)
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)
        before = torch.cuda.memory_allocated(DEVICE)
        step()
        step()
        return (torch.cuda.max_memory_allocated(DEVICE) - before) / 2**20
    before = _resident_mib()
    step()
    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before


def _resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def memory_cell(model_name: str, label: str, length: int) -> float | None:
    """:func:`step_memory` in a fresh interpreter, so the peak belongs to this cell alone."""
    cmd = [sys.executable, "-m", "benchmarks.norms", "--memory-cell", model_name, label, str(length),
           "--device", str(DEVICE), "--precision", PRECISION, "--batch", str(BATCH), "--channels", str(CHANNELS),
           "--heads", str(HEADS), "--dtn-method", DTN_METHOD]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        print(f"memory cell {model_name} {label} T={length} failed: {done.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return float(done.stdout.strip().splitlines()[-1])


#: The official shapes the traffic table is computed at (``tasks``' official configs).
TRAFFIC_TASKS = ("listops", "text")
#: The eager DTN paths counted op by op: (label, method).
EAGER_PATHS = (("dtn conv", "conv"), ("dtn fft", "fft"))
#: The wide kernel of the issue's GPU target: 255 offsets.
WIDE_SUPPORT = 255


def official_shape(task: str) -> tuple[int, int, int, int]:
    """``(B, T, C, H)`` of the official config of ``task``, ``T`` counting the CLS token."""
    model, train, _ = TASKS.get(task)().spec(Preset.official, "transformer")
    return train.batch_size, model.encoder_length, model.emb_dim, model.num_heads


def eager_traffic(norm: torch.nn.Module, batch: int, length: int) -> tuple[float, float, int]:
    """``(read, written)`` bytes per token of one forward + backward of ``norm``, and its op count."""
    torch.manual_seed(0)
    x = torch.randn(batch, length, norm.dim, requires_grad=True)
    grad = torch.randn(batch, length, norm.dim)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[-1, length // 2:] = False  # one sequence half padded, as in a real batch
    traffic = count_traffic(lambda: norm(x, mask).backward(grad))
    tokens = batch * length
    return traffic.read / tokens, traffic.written / tokens, traffic.ops


def fused_traffic_fn():
    """``lra_dtn.dtn.fused.traffic_bytes`` (analytic bytes of the fused kernels), or ``None`` with why."""
    try:
        from lra_dtn.dtn import fused
    except ImportError as error:
        return None, f"no fused path here ({error})"
    return fused.traffic_bytes, ""


def traffic_table(traffic_batch: int) -> list[str]:
    """Markdown rows: bytes per token of LN and each DTN path at each official shape."""
    lines = ["| task (B, T, C, H) | norm | read B/token | written B/token | total | x LN | passes | ops |",
             "|---|---|---|---|---|---|---|---|"]
    fused, why = fused_traffic_fn()
    for task in TRAFFIC_TASKS:
        B, T, C, H = official_shape(task)
        shape = f"{task} ({B}, {T}, {C}, {H})"
        rows = [("ln", *eager_traffic(build_norm("ln", C, H), traffic_batch, T))]
        for label, method in EAGER_PATHS:
            rows.append((label, *eager_traffic(DynamicTokenNorm(C, H, method=method), traffic_batch, T)))
        if fused is not None:
            init = DynamicTokenNorm(C, H)
            support = support_width(init.pos_proj.weight, T)  # the fused kernels' own support
            for label, width in ((f"dtn fused ({support} offsets)", support), (f"dtn fused ({WIDE_SUPPORT} offsets)", WIDE_SUPPORT)):
                read, written = fused(B, T, C, H, width)
                rows.append((label, read / (B * T), written / (B * T), 0))
        ln_total = rows[0][1] + rows[0][2]
        for label, read, written, ops in rows:
            total = read + written
            lines.append(f"| {shape} | {label} | {read:,.0f} | {written:,.0f} | {total:,.0f} | {total / ln_total:.1f} | "
                         f"{total / (C * 4):.1f} | {ops or 'fused'} |")
    if fused is None:
        lines.append(f"\n(dtn fused: {why})")
    return lines

# ----------------------------------------------------------------------------------------------------
# Issue 13: DTN's 2-D prior at the image tasks' official shapes.

GRID_TASKS = ("image", "pathfinder")
GRID_NORMS = {"ln": ("ln", "2d"), "dtn-1d": ("dtn", "1d"), "dtn-2d": ("dtn", "2d")}  # label: (norm, norm_prior)


def grid_training_step(task: str, label: str):
    """A training step of ``task``'s official Transformer (its image grid declared) with ``label``'s norm
    and prior; every pixel real, as in these tasks' batches."""
    torch.manual_seed(0)
    name, prior = GRID_NORMS[label]
    cfg = TASKS.get(task)().spec(Preset.official, "transformer")[0]
    cfg = replace(cfg, attn_dropout=0.0, norm_prior=prior)
    model = build_model("transformer", cfg, name).to(DEVICE).train()
    return step_closure(model, cfg, torch.ones(BATCH, cfg.max_len, dtype=torch.bool, device=DEVICE))


def grid_prior_case(rounds: int) -> list[str]:
    """Table rows: per image task, the LN step time and the DTN-1D/LN and DTN-2D/LN ratios."""
    lines = []
    for task in GRID_TASKS:
        times = fastest({label: grid_training_step(task, label) for label in GRID_NORMS}, rounds=rounds)
        ln = times["ln"]
        lines.append(f"| {task} | {ln[0]:.2f} s | " + " | ".join(
            f"{ratio(times[k][0], ln[0])} ({ratio(times[k][1], ln[1])})" for k in ("dtn-1d", "dtn-2d")) + " |")
        print(lines[-1], flush=True)
    return ["| task (official Transformer) | LN step | DTN-1D / LN | DTN-2D / LN |", "|---|---|---|---|", *lines]


#: Batches one timed round of ``--small-model`` steps runs through (the same for LN and DTN).
SMALL_MODEL_BATCHES = 8


#: The norms ``--small-model`` compares: label -> (norm, DTN method); ``dtn eager`` is the eager path
#: that ``auto`` took on CPU before the native kernels, measured in the same run.
SMALL_MODEL_NORMS = {"ln": ("ln", None), "dtn": ("dtn", "auto"), "dtn eager": ("dtn", "conv")}


def small_model_jobs(kind: str) -> dict[str, callable]:
    """Closures for ``--small-model``, one per :data:`SMALL_MODEL_NORMS`: one norm call (``kind="norm"``) or
    :data:`SMALL_MODEL_BATCHES` training steps (``kind="step"``) of the cpu-preset ListOps Transformer."""
    model_cfg, train_cfg, data = TASKS.get("listops")().spec(Preset.cpu, "transformer")
    B, T, C, H = train_cfg.batch_size, model_cfg.encoder_length, model_cfg.emb_dim, model_cfg.num_heads
    g = torch.Generator().manual_seed(0)
    jobs = {}
    if kind == "norm":
        x = torch.randn(B, T, C, generator=g, requires_grad=True)
        grad = torch.randn(B, T, C, generator=g)
        mask = torch.arange(T)[None] < torch.randint(data.min_length + 1, T + 1, (B,), generator=g)[:, None]
        for label, (name, method) in SMALL_MODEL_NORMS.items():
            norm = with_method(build_norm(name, C, H), method)
            jobs[label] = lambda norm=norm: norm(x, mask).backward(grad)
        return jobs
    batches = []
    for _ in range(SMALL_MODEL_BATCHES):
        lengths = torch.randint(data.min_length, data.max_length + 1, (B,), generator=g)
        mask = torch.arange(int(lengths.max()))[None] < lengths[:, None]
        ids = torch.randint(1, model_cfg.vocab_size, mask.shape, generator=g) * mask
        batches.append((ids, mask, torch.randint(0, model_cfg.num_classes, (B,), generator=g)))
    for label, (name, method) in SMALL_MODEL_NORMS.items():
        torch.manual_seed(0)
        model = with_method(build_model("transformer", model_cfg, name).train(), method)
        optimizer = build_optimizer(model, train_cfg)

        def steps(model=model, optimizer=optimizer) -> None:
            for ids, mask, labels in batches:
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(ids, mask), labels).backward()
                optimizer.step()

        jobs[label] = steps
    return jobs


def print_small_model_table(rounds: int) -> None:
    """``--small-model``: ms per norm call and per training step (CPU time) of LN, DTN and DTN's eager path,
    and each DTN's ratio to LN of the CPU time (of the wall time), a row as soon as it is measured."""
    print("| cpu-preset ListOps Transformer | LN CPU ms | DTN CPU ms | DTN/LN CPU (wall) | DTN eager CPU ms | "
          "eager/LN CPU (wall) |\n|---|---|---|---|---|---|")
    cases = (("norm", "one norm call, fwd + bwd", 1), ("step", "one training step", SMALL_MODEL_BATCHES))
    for kind, label, per in cases:
        times = fastest(small_model_jobs(kind), rounds=rounds)
        ln = times["ln"]
        print(f"| {label} | {1e3 * ln[1] / per:.2f} | " + " | ".join(
            f"{1e3 * times[k][1] / per:.2f} | {ratio(times[k][1], ln[1])} ({ratio(times[k][0], ln[0])})"
            for k in ("dtn", "dtn eager")) + " |", flush=True)


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def main(argv: list[str] | None = None) -> None:
    global DEVICE, PRECISION, BATCH, CHANNELS, HEADS, DTN_METHOD  # the measured case, set once from the flags
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--rounds", type=int, default=3, help="timed repetitions of each training step")
    parser.add_argument("--models", nargs="+", default=["transformer", "bigbird"])
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="of the training steps")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--channels", type=int, default=CHANNELS, help="C, also the encoders' width")
    parser.add_argument("--heads", type=int, default=HEADS)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-cell memory processes")
    parser.add_argument("--dtn-method", default="auto", help="DTN's path in the norm and step rows (default: %(default)s; "
                        "e.g. conv for the eager path on CPU)")
    parser.add_argument("--json", help="also write the raw numbers here")
    parser.add_argument("--traffic", action="store_true",
                        help="print the bytes per token LN and each DTN path read and write at the official shapes")
    parser.add_argument("--traffic-batch", type=int, default=2, help="sequences counted for --traffic (per token)")
    parser.add_argument("--small-model", action="store_true",
                        help="LN vs DTN in the cpu-preset ListOps Transformer (norm call and training step)")
    parser.add_argument("--grid-prior", action="store_true", help="only the image tasks, DTN's 1-D vs 2-D prior")
    parser.add_argument("--memory-cell", nargs=3, metavar=("MODEL", "NORM", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    DEVICE, PRECISION = torch.device(args.device), args.precision
    BATCH, CHANNELS, HEADS, DTN_METHOD = args.batch, args.channels, args.heads, args.dtn_method
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_cell:
        model_name, label, length = args.memory_cell
        print(step_memory(model_name, label, int(length)))
        return
    if args.traffic:
        print("Bytes one forward + backward reads and writes per token (float32; DTN at its local init); "
              "passes = total / the activations' bytes per token (4 C); ops = data-moving aten ops")
        print("\n".join(traffic_table(args.traffic_batch)))
        return
    if args.small_model:
        print(f"{torch.get_num_threads()} CPU threads; fastest of {max(5, args.rounds)} rounds", flush=True)
        print_small_model_table(max(5, args.rounds))
        return
    if args.grid_prior:
        print(f"B={BATCH}, {DEVICE}, {PRECISION} steps, {torch.get_num_threads()} CPU threads. Ratios of the fastest "
              "wall time (of the process CPU time)", flush=True)
        print("\n" + "\n".join(grid_prior_case(args.rounds)))
        return

    models = [m for m in args.models if m in MODELS]
    for missing in sorted(set(args.models) - set(models)):
        print(f"{missing}: not registered in models.MODELS, skipped", flush=True)
    print(f"B={BATCH}, C={CHANNELS}, H={HEADS}, {DEVICE}, DTN method {DTN_METHOD}, {PRECISION} steps, "
          f"{torch.get_num_threads()} CPU threads. "
          "Ratios DTN/LN of the fastest wall time (of the process CPU time); memory: peak over two steps", flush=True)
    results, lines = [], []
    for length in args.lengths:
        print(f"T={length}: kernels {describe_kernels(length)}", flush=True)
        times = fastest(norm_jobs(length), rounds=max(5, args.rounds))
        results.append(dict(T=length, what="norm", seconds={k: v[0] for k, v in times.items()},
                            cpu_seconds={k: v[1] for k, v in times.items()}))
        ln = times["ln"]
        lines.append(f"| {length} | norm fwd+bwd | {1e3 * ln[0]:.2f} ms | " + " | ".join(
            f"{1e3 * times[k][0]:.1f} ms, {ratio(times[k][0], ln[0])} ({ratio(times[k][1], ln[1])})"
            for k in ("dtn-init", "dtn-wide")) + " | - | - |")
        print(lines[-1], flush=True)
        for model_name in models:
            times = fastest({label: training_step(model_name, label, length) for label in NORMS}, rounds=args.rounds)
            memory = {} if args.no_memory else {label: memory_cell(model_name, label, length) for label in NORMS}
            results.append(dict(T=length, what=f"{model_name} step", seconds={k: v[0] for k, v in times.items()},
                                cpu_seconds={k: v[1] for k, v in times.items()}, peak_mib=memory))
            ln = times["ln"]
            lines.append(f"| {length} | {model_name} step | {ln[0]:.2f} s | " + " | ".join(
                f"{ratio(times[k][0], ln[0])} ({ratio(times[k][1], ln[1])})" for k in ("dtn-init", "dtn-wide"))
                + (f" | {memory['ln']:.0f} MiB | " if memory.get("ln") else " | - | ")
                + " / ".join(ratio(memory.get(k), memory.get("ln")) for k in ("dtn-init", "dtn-wide")) + " |")
            print(lines[-1], flush=True)
    print("\n| T | what | LN | DTN init / LN | DTN wide / LN | LN peak | memory DTN/LN init / wide |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
