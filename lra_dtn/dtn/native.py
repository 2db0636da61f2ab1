"""DTN's fused CPU path (``method="native"``, what ``auto`` takes on CPU): two C kernels in ``native.c``.

Why: the eager path (:mod:`lra_dtn.dtn.cpu`) dispatches ~500 PyTorch ops per call. At the ``cpu``
preset's ListOps shape (B=32, T=101, C=64, H=4) that was 6.5-7.7 ms per norm, forward + backward,
against LayerNorm's 0.4 ms, and a training step 1.8-1.9 times LayerNorm's. ``native.c`` does the same
arithmetic in a few passes over each sequence, in cache: one forward, one backward that recomputes the
banded sums (keeping, like LayerNorm, only the input and per-token statistics), sequences in parallel on
PyTorch's thread count: 2.0-2.3 ms per norm and a step 1.25 times LayerNorm's
(``python -m benchmarks.norms --small-model --threads 1``).

Built on first use with the system C compiler (``$CC``, else ``cc``; ``-O3 -march=native -fopenmp``), one
library per channel count and head count (compile-time constants there: every loop over a token's
channels has a known length), into a cache folder (``$LRA_DTN_CACHE``, else ``$XDG_CACHE_HOME/lra_dtn``
or ``~/.cache/lra_dtn``), keyed by the source, the flags, the compiler and the CPU, and written atomically
so concurrent processes (DDP ranks) never load a half-written library. It links the OpenMP runtime
PyTorch has already loaded (same ``libgomp.so.1``), so there is one thread pool, not two.

What it serves: the plans that the eager path would convolve directly with no exact rows
(:func:`lra_dtn.dtn.cpu.make_plan`): the kernel's support is a band of offsets every real token
reaches. Far-peaked kernels (rows recomputed with their own shift) and kernels so wide that FFT wins go
to the eager path; so does everything when no compiler is found (``auto`` warns once; ``native``
asked for by name raises). The heads served are never far, so the ``pos_proj`` gradient's features are
``(d, d^2)``, which is what the eager path's centred features are for them (centre ``d = 0``).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import warnings
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lra_dtn.dtn import cpu
from lra_dtn.dtn.module import DEVICE_PATHS, PATHS
from lra_dtn.workdirs import atomic_file

SOURCE = Path(__file__).with_name("native.c")
#: Without OpenMP the pragmas are ignored and sequences run on one thread: the second choice.
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native", "-fopenmp-simd"], ["-O3"])
#: ``-fno-math-errno``: ``sqrtf`` need not set ``errno`` (nothing reads it), which lets its loops vectorise.
#: ``-ffp-contract=off``: every product rounded as written (gcc's ISO mode and clang's default differ):
#: ``r x - mu`` must subtract the same rounded ``xs = r x`` that the mean was made of (fused, a token that
#: is its own only source came out ~1e-4 off; contraction saved 2 % of the time).
COMMON_FLAGS = ["-std=c11", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=off"]


class NativeUnavailable(RuntimeError):
    """The C kernels could not be built or loaded here (the message says why)."""


class _Params(ctypes.Structure):
    """``Params`` of ``native.c``, field for field."""

    _fields_ = [
        *[(name, ctypes.c_int64) for name in ("B", "T", "C", "H", "W", "dmin")],
        *[(name, ctypes.c_void_p) for name in ("kernel", "gate_mean", "gate_var", "weight", "bias")],
        ("eps", ctypes.c_float),
        ("threads", ctypes.c_int),
    ]


def cache_dir() -> Path:
    """Where built libraries live (see the module's docstring)."""
    if "LRA_DTN_CACHE" in os.environ:
        return Path(os.environ["LRA_DTN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lra_dtn"


def _cpu_identity() -> str:
    """What ``-march=native`` compiles for: the CPU's feature flags where Linux lists them."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.machine() + platform.processor()


@functools.cache
def build(channels: int, heads: int) -> ctypes.CDLL | NativeUnavailable:
    """The kernels for ``channels`` and ``heads`` (compile-time constants of ``native.c``: one library per
    shape), built on first use, or why they cannot be: either is remembered, so a machine without a
    compiler tries once per shape, not once per call."""
    compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or ""]
    if not compiler[0]:
        return NativeUnavailable("no C compiler found (install gcc, or set CC)")
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        return NativeUnavailable(f"the C compiler {' '.join(compiler)!r} does not run: {error}")
    shape = [f"-DCHANNELS={channels}", f"-DHEADS={heads}"]
    built_from = [SOURCE.read_text(), *compiler, version, _cpu_identity()]  # read once, not per flag set
    errors = []
    for flags in FLAG_SETS:
        command = [*flags, *shape, *COMMON_FLAGS]
        key = hashlib.sha256("\0".join([*built_from, *command]).encode()).hexdigest()
        path = cache_dir() / f"dtn-c{channels}-h{heads}-{key[:20]}.so"
        if not path.exists():
            try:
                with atomic_file(path, suffix=".so") as tmp:
                    subprocess.run([*compiler, *command, "-o", str(tmp), str(SOURCE)], capture_output=True,
                                   text=True, check=True)
            except subprocess.CalledProcessError as error:
                errors.append(f"{' '.join(flags)}: {error.stderr.strip()[-500:]}")
                continue
            except OSError as error:
                return NativeUnavailable(f"cannot write the DTN kernels to {path.parent}: {error} "
                                         f"(set LRA_DTN_CACHE to a writable folder)")
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as error:  # e.g. an OpenMP symbol the runtime torch loaded lacks: the next flags
            errors.append(f"{' '.join(flags)}: cannot load {path.name}: {error}")
            continue
        for name in ("dtn_forward", "dtn_backward"):
            getattr(lib, name).restype = ctypes.c_int
        return lib
    return NativeUnavailable(f"{' '.join(compiler)} could not build {SOURCE.name}:\n" + "\n".join(errors))


def library(channels: int, heads: int) -> ctypes.CDLL:
    """:func:`build`'s library, or :class:`NativeUnavailable` raised with its reason."""
    built = build(channels, heads)
    if isinstance(built, NativeUnavailable):
        raise NativeUnavailable(str(built))
    return built


def available(channels: int = 2, heads: int = 1) -> bool:
    """Whether the kernels build and load here (for this shape)."""
    try:
        library(channels, heads)
    except NativeUnavailable:
        return False
    return True


def _pointer(t: Tensor | None) -> ctypes.c_void_p | None:
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _check(status: int) -> None:
    if status == -2:
        raise RuntimeError("DTN native kernels: a library built for another (channels, heads) was called")
    if status != 0:
        raise MemoryError("DTN native kernels: out of memory for the tables or a thread's workspace")


class _NativeFunction(torch.autograd.Function):
    """Saves the input, the mask, the kernel's weights and per-token statistics (``(B, T, H + 2)``: each
    head's RMS scale, LayerNorm's mean and variance), like LayerNorm its mean and rstd; backward recomputes
    the rest. The parameter gradients come back from C finished (summed over the batch, through the
    sigmoid and the kernel's logits), so a call is two C calls and a few allocations. Backward hands C
    pointers into the tensors it gets back from ``saved_tensors`` (with saved-tensor hooks, as in
    non-reentrant checkpointing, those are new tensors), never into forward's."""

    @staticmethod
    def forward(ctx, x, pos_weight, pos_bias, gate_mean, gate_var, weight, bias, mask, num_heads, eps, plan):
        B, T, C = x.shape
        f32 = torch.float32
        inputs = [plan.kernel.contiguous()]  # float64 (H, W), then the parameters as float32
        inputs += [t.detach().to(f32).contiguous() for t in (gate_mean, gate_var, weight, bias)]
        with torch.autocast("cpu", enabled=False):
            x32 = x.detach().to(f32).contiguous()
            mask = None if mask is None else mask.to(torch.bool).contiguous()  # C reads it as bytes 0/1
            shape = (B, T, C, num_heads, plan.width, plan.dmin)
            y = torch.empty_like(x32)
            stats = x32.new_empty(B, T, num_heads + 2)
            _check(library(C, num_heads).dtn_forward(ctypes.byref(_params(shape, inputs, eps)), _pointer(x32),
                                                     _pointer(mask), _pointer(y), _pointer(stats)))
        ctx.save_for_backward(x32, stats, pos_bias, *inputs, *(() if mask is None else (mask,)))
        ctx.shape, ctx.eps, ctx.x_dtype = shape, eps, x.dtype
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable  # the C backward is not itself differentiable: a double backward raises
    def backward(ctx, grad_y):
        x32, stats, pos_bias, *inputs = ctx.saved_tensors
        inputs, mask = inputs[:5], (inputs[5] if len(inputs) > 5 else None)
        _, gate_mean, gate_var, weight, bias = inputs
        C, H = ctx.shape[2], ctx.shape[3]
        gy = grad_y.to(torch.float32).contiguous()
        grad_x = torch.empty_like(x32)
        grads = torch.empty(2 * C + 4 * H, dtype=torch.float64)
        _check(library(C, H).dtn_backward(ctypes.byref(_params(ctx.shape, inputs, ctx.eps)), _pointer(x32),
                                          _pointer(mask), _pointer(stats), _pointer(gy), _pointer(grad_x),
                                          _pointer(grads)))
        g_weight, g_bias, g_gate_mean, g_gate_var, g_pos_weight = grads.split([C, C, H, H, 2 * H])
        return (
            grad_x.to(ctx.x_dtype), g_pos_weight.view(H, 2).to(pos_bias.dtype) if ctx.needs_input_grad[1] else None,
            torch.zeros_like(pos_bias), g_gate_mean.to(gate_mean.dtype) if ctx.needs_input_grad[3] else None,
            g_gate_var.to(gate_var.dtype), g_weight.to(weight.dtype), g_bias.to(bias.dtype), None, None, None, None,
        )


def _params(shape: tuple[int, ...], inputs: list[Tensor], eps: float) -> _Params:
    """``Params`` for C: the shape ``(B, T, C, H, W, dmin)``, pointers into ``inputs`` (kernel, gate_mean,
    gate_var, weight, bias: the caller keeps them alive during the call) and the thread count now."""
    return _Params(*shape, *[_pointer(t) for t in inputs], eps, torch.get_num_threads())


def serves(plan: cpu.Plan, dtype: torch.dtype) -> bool:
    """Whether the C kernels compute this plan: a band every real token reaches (no exact rows; where the
    eager path would take FFT, so does this one), and a float32/bf16/fp16 input (float64 inputs keep
    float64 statistics on the eager path)."""
    return plan.method == "conv" and not plan.far and dtype != torch.float64


def normalize(norm, x: Tensor, mask: Tensor | None, *, required: bool = False) -> Tensor:
    """DTN of ``x`` (on CPU) with the parameters of ``norm``, in C where :func:`serves` the plan, otherwise
    the eager path's choice. ``required``: raise :class:`NativeUnavailable` instead of warning and falling
    back when the kernels cannot be built."""
    if x.device.type != "cpu":
        raise RuntimeError(f"DTN method 'native' runs on CPU tensors; got a {x.device.type} tensor")
    plan = cpu.make_plan(norm.pos_proj.weight, x.shape[1], "auto", torch.float32)
    try:
        library(x.shape[-1], norm.num_heads)
    except NativeUnavailable as error:
        if required:
            raise
        warnings.warn(f"DTN's C kernels are unavailable, using the eager path: {error}", stacklevel=3)
        return cpu.normalize(norm, x, mask, method="auto")
    if not serves(plan, x.dtype):
        return cpu.normalize(norm, x, mask, method="auto")
    return _NativeFunction.apply(x, norm.pos_proj.weight, norm.pos_proj.bias, norm.mean_gate(), norm.gate_var,
                                 norm.weight, norm.bias, mask, norm.num_heads, norm.eps, plan)


PATHS.register("native")(functools.partial(normalize, required=True))
DEVICE_PATHS["cpu"] = normalize  # what ``auto`` takes for CPU tensors
