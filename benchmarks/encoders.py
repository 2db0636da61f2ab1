"""Time and peak memory of one training step (forward + backward) per encoder and length, on CPU.

    python -m benchmarks.encoders                      # T in 1024..8192, B=8, about 5 minutes
    python -m benchmarks.encoders --lengths 1024 2048 --json bench.json

The encoder is the official Retrieval size (emb = qkv = 128, mlp 512, 4 heads, 4 layers, CLS) with
``max_len = T``, LayerNorm, dropout 0.1. Attention dropout is 0 so that the dense Transformer runs
PyTorch's fused CPU attention kernel (with attention dropout it falls back to a kernel that stores
every ``T x T`` matrix and runs out of memory at 4096); the baseline is therefore the fastest dense one.

Rows: ``transformer``, ``bigbird`` (block 64, 3 random blocks), ``reformer`` with buckets of about 64
tokens (``n_buckets = T / 64``: LSH as in the Reformer paper, linear in T) and ``reformer-official``
(``n_buckets = 10`` over ``max_len``, the LRA setting: every query sees ``2T/10`` keys, so its cost
grows as ``T^2 / 5``; run up to ``--official-max``, 4096 by default, because it is slow).

Each (encoder, T) runs in its own process so that peak memory is that step's alone: the peak resident
set during the steps minus the resident set before them. The process keeps freed memory in its heap
and lets idle OpenMP threads sleep (see ``CACHING_MALLOC`` and ``PASSIVE_OPENMP``; variables already
set in the environment win). Time is the fastest of a few steps, as wall clock and as process CPU
time; on a machine shared with other jobs the CPU time is the steadier of the two, and the growth and
speed-up columns use it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from lra_dtn.config import ModelConfig
from models import build_model

BATCH = 8
ROWS = ["transformer", "bigbird", "reformer", "reformer-official"]
RETRIEVAL_SIZE = dict(vocab_size=257, num_classes=2, num_layers=4, emb_dim=128, qkv_dim=128, mlp_dim=512, num_heads=4)


def encoder(row: str, length: int) -> tuple[str, ModelConfig]:
    """A benchmark row -> (registered model name, config at ``max_len = length``)."""
    cfg = ModelConfig(max_len=length, dropout=0.1, attn_dropout=0.0, **RETRIEVAL_SIZE)
    if row == "reformer":
        return "reformer", dataclasses.replace(cfg, n_buckets=max(2, length // 64))
    if row == "reformer-official":
        return "reformer", cfg
    return row, cfg


def repeats(row: str, length: int) -> tuple[int, int]:
    """(warm-up steps, timed steps). The fastest of two timed steps skips the first step's one-off
    costs (the heap growing to its peak); only the dense step at 8192, a minute long, runs once."""
    if length <= 2048:
        return 1, 2
    return (0, 1) if row == "transformer" and length >= 8192 else (0, 2)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(row: str, length: int, batch: int) -> dict:
    """One (encoder, T) cell: fastest step time and peak step memory."""
    torch.manual_seed(0)
    name, cfg = encoder(row, length)
    model = build_model(name, cfg, "ln").train()
    ids = torch.randint(1, cfg.vocab_size, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.bool)
    labels = torch.randint(0, cfg.num_classes, (batch,))
    warmup, timed = repeats(row, length)
    before = peak_rss_mib()
    walls, cpus = [], []
    for step in range(warmup + timed):
        model.zero_grad(set_to_none=True)
        wall, cpu = time.perf_counter(), time.process_time()
        F.cross_entropy(model(ids, mask), labels).backward()
        if step >= warmup:
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    return dict(model=row, T=length, batch=batch, wall_s=min(walls), cpu_s=min(cpus),
                peak_mib=peak_rss_mib() - before, steps=timed)


# glibc hands every allocation over 32 MiB back to the OS when it is freed and page-faults it in again
# at the next step: from T = 2048 on (B=8: one MLP activation is 33 MiB) a step spends ~30% of its
# CPU time faulting pages in the kernel, at T = 1024 none, which makes every encoder, even one without
# attention, look superlinear. Keeping freed memory in the heap, as a caching allocator would, removes
# that step; --system-malloc measures with glibc's defaults instead.
CACHING_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}
# Idle OpenMP threads sleep instead of spinning: on a shared machine spinning inflates CPU time and,
# oversubscribed, wall time too.
PASSIVE_OPENMP = {"OMP_WAIT_POLICY": "PASSIVE"}


def run_cell(row: str, length: int, batch: int, system_malloc: bool = False) -> dict:
    """``measure`` in a fresh interpreter, so the peak resident set belongs to this cell only."""
    cmd = [sys.executable, "-m", "benchmarks.encoders", "--cell", row, str(length), "--batch", str(batch)]
    env = {**PASSIVE_OPENMP, **({} if system_malloc else CACHING_MALLOC), **os.environ}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        return dict(model=row, T=length, batch=batch, error=done.stderr.strip().splitlines()[-1:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict], lengths: list[int]) -> str:
    """Markdown: per encoder, wall / CPU seconds and peak MiB per T, the growth 4x T and speed-up."""
    cells = {(r["model"], r["T"]): r for r in results}
    rows = list(dict.fromkeys(r["model"] for r in results))
    head = ["encoder"] + [f"T={t}" for t in lengths]
    lo, hi = (1024, 4096) if {1024, 4096} <= set(lengths) else (lengths[0], lengths[-1])
    head += [f"cpu {hi}/{lo}", f"dense/x cpu @{hi}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    dense = cells.get(("transformer", hi), {}).get("cpu_s")
    for row in rows:
        out = [row]
        for t in lengths:
            c = cells.get((row, t))
            if c is None:
                out.append("skipped")
            elif "error" in c:
                out.append(f"failed: {' '.join(c['error'])[:40]}")
            else:
                out.append(f"{c['wall_s']:.2f} / {c['cpu_s']:.2f} s, {c['peak_mib']:.0f} MiB")
        a, b = cells.get((row, lo), {}).get("cpu_s"), cells.get((row, hi), {}).get("cpu_s")
        out.append(f"{b / a:.2f}" if a and b else "-")
        out.append(f"{dense / b:.2f}" if dense and b else "-")
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--models", nargs="+", choices=ROWS, default=ROWS)
    parser.add_argument("--official-max", type=int, default=4096, help="longest T for reformer-official")
    parser.add_argument("--system-malloc", action="store_true", help="glibc's default allocator settings")
    parser.add_argument("--json", help="also write the raw cells here")
    parser.add_argument("--cell", nargs=2, metavar=("MODEL", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cell:
        print(json.dumps(measure(args.cell[0], int(args.cell[1]), args.batch)))
        return
    results = []
    for length in args.lengths:  # length-major, so that the encoders at one T share the machine's load
        for row in args.models:
            if row == "reformer-official" and length > args.official_max:
                continue
            results.append(run_cell(row, length, args.batch, args.system_malloc))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(f"B={args.batch}, emb 128, 4 layers, CPU threads {torch.get_num_threads()}; "
          "each cell: wall / CPU seconds per step (fastest), peak step memory")
    print(table(results, args.lengths))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
