"""DTN's fused Triton path against the dense float64 reference, run by Triton's interpreter on CPU tensors.

``TRITON_INTERPRET=1`` must be set before triton is first imported (it is read at import); conftest.py
sets it before anything imports ``lra_dtn``. The interpreter executes every program of the grid in
Python, so the shapes are small and the tile is 32 tokens: sequences of 45 tokens still span two tiles
and every source loop crosses a tile boundary. About 30 s on a loaded 2-core machine.
"""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

# triton 3.6's interpreter cannot loop over run-time bounds (its scalars are 1-element arrays). The kernels
# compile with 3.6 as with 3.9 (the script of the slow test below, checked with both by hand).
pytest.importorskip("triton", minversion="3.9", reason="the fused DTN tests need triton >= 3.9: pip install '.[gpu]'")

from lra_dtn.dtn import PATHS, DynamicTokenNorm, fused  # noqa: E402
from lra_dtn.dtn.module import DEVICE_PATHS  # noqa: E402
from lra_dtn.dtn.reference import dense_reference, reference, reference_gradients  # noqa: E402
from test_dtn import KERNELS, randomised  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the fused kernels run on CPU tensors only under TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(fused, "BLOCK", 32)


def mixed_masks(length: int, seed: int = 0) -> torch.Tensor:
    """Three sequences: a prefix, scattered real tokens, and all but one token padded."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(3, length, dtype=torch.bool)
    mask[0, : max(1, 2 * length // 3)] = True
    mask[1] = torch.rand(length, generator=g) < 0.5
    mask[2, int(torch.randint(0, length, (1,), generator=g))] = True
    return mask


def compare(norm: DynamicTokenNorm, x: torch.Tensor, mask: torch.Tensor | None, tol: float = 1e-5) -> None:
    """Forward and every gradient (x and all parameters) of ``norm`` against the float64 reference:
    relative to each tensor's largest reference value, on the real tokens."""
    real = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * real[..., None]
    norm.zero_grad()
    x32 = x.clone().requires_grad_()
    y = norm(x32, mask)
    y.backward(grad_y)
    ref, expected = dense_reference(norm, x, mask), reference_gradients(norm, x, mask, grad_y)
    assert torch.isfinite(y).all() and torch.isfinite(x32.grad).all()
    assert (y.double() - ref).abs()[real].max() <= tol * ref.abs()[real].max()
    assert (x32.grad.double() - expected["x"]).abs().max() <= tol * expected["x"].abs().max()
    for name, p in norm.named_parameters():
        if name == "pos_proj.bias":  # cancels in the softmax: exactly zero here, rounding noise there
            assert (p.grad == 0).all() and expected[name].abs().max() < 1e-9
            continue
        # pos_proj: sums over pairs of terms ~ d^2 that cancel; at T = 45 a flat kernel's loses ~1.5e-5 in
        # float32 on every path (conv 1.8e-5, fft 1.1e-5, fused 1.4e-5)
        rel = 5 * tol if name == "pos_proj.weight" else tol
        assert (p.grad.double() - expected[name]).abs().max() <= rel * expected[name].abs().max() + 1e-7, name


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_fused_matches_the_dense_reference_forward_and_backward(kernel: str) -> None:
    norm = DynamicTokenNorm(4, 1, method="fused")  # one head: the interpreter's time grows with heads
    if KERNELS[kernel] is not None:
        randomised(norm, *KERNELS[kernel], seed=3)
    x = torch.randn(3, 45, 4, generator=torch.Generator().manual_seed(0)) * 2 + 0.3
    compare(norm, x, mixed_masks(45))


@pytest.mark.parametrize("length", [1, 2])
def test_fused_single_and_two_token_sequences(length: int) -> None:
    norm = randomised(DynamicTokenNorm(8, 2, method="fused"), 30.0, -1.0)
    x = torch.randn(2, length, 8, generator=torch.Generator().manual_seed(length))
    compare(norm, x, None)
    compare(norm, x, torch.tensor([[True] * length, [False] * (length - 1) + [True]]))


def test_fused_dtn_var_and_no_mask() -> None:
    norm = randomised(DynamicTokenNorm(12, 3, method="fused", only_var=True), 0.4, -0.1, seed=2)
    compare(norm, torch.randn(2, 40, 12, generator=torch.Generator().manual_seed(2)), None)


def test_pos_proj_gradient_of_a_kernel_collapsed_on_the_farthest_offset(monkeypatch) -> None:
    """Issue 11's float32 defect: an upward kernel (``w2 = 0.5``) puts all of a token's weight on the
    farthest source; the true ``pos_proj`` gradient is ~0, the moment form returned up to 56."""
    monkeypatch.setattr(fused, "BLOCK", 64)  # every source of every token: fewer, larger tiles
    norm = DynamicTokenNorm(4, 1, method="fused")
    with torch.no_grad():
        norm.pos_proj.weight.copy_(torch.tensor([[0.0, 0.5]]))
    x = torch.randn(1, 300, 4, generator=torch.Generator().manual_seed(0))
    norm(x).square().sum().backward()
    params = {name: p.detach().double().requires_grad_() for name, p in norm.named_parameters()}
    reference(params, x.double(), None, 1, norm.eps).square().sum().backward()
    expected = params["pos_proj.weight"].grad
    assert expected.abs().max() < 1e-20
    assert norm.pos_proj.weight.grad.abs().max() < 1e-6


def test_bf16_autocast_keeps_statistics_in_float32() -> None:
    norm = randomised(DynamicTokenNorm(8, 2, method="fused"), 0.1, -0.01)
    x = (torch.randn(2, 40, 8) * 0.5 + 20).bfloat16()  # large mean, small spread: E[x^2] - E[x]^2 cancels
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert torch.isfinite(y).all() and torch.isfinite(x.grad.float()).all()
    conv = DynamicTokenNorm(8, 2, method="conv")
    conv.load_state_dict(norm.state_dict())
    torch.testing.assert_close(y.float(), conv(x.detach().float()), rtol=2e-2, atol=2e-2)


def test_no_host_synchronisation_in_forward_and_backward(monkeypatch) -> None:
    """Nothing in a fused training step reads a device value on the host: the support is computed by
    every program from ``w1, w2``, never planned on the host."""
    norm = randomised(DynamicTokenNorm(8, 2, method="fused"), 2000.0, -4.0)  # far-shifted
    x = torch.randn(2, 40, 8, requires_grad=True)
    mask = torch.arange(40)[None] < torch.tensor([[40], [13]])

    def host_sync(self, *args, **kwargs):
        raise AssertionError("host-device synchronisation")

    for name in ("item", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, host_sync)
    with pytest.raises(AssertionError, match="synchronisation"):
        bool(torch.ones(()))  # the patch catches a sync
    y = norm(x, mask)
    y.backward(torch.ones_like(y))
    monkeypatch.undo()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in norm.parameters())


def test_auto_takes_the_fused_path_for_cuda_tensors_only(monkeypatch) -> None:
    """``auto`` dispatches on the tensor's device (``DEVICE_PATHS``): CUDA -> fused (registered with triton
    installed); CPU tensors take the CPU path (test_dtn_native.py)."""
    assert PATHS.get("fused") is fused.normalize and DEVICE_PATHS["cuda"] is fused.normalize
    calls = []
    monkeypatch.setitem(DEVICE_PATHS, "cuda", lambda norm, x, mask: calls.append(x) or "fused")
    norm = DynamicTokenNorm(8, 2)
    cuda_like = SimpleNamespace(device=torch.device("cuda"))
    assert PATHS.get("auto")(norm, cuda_like, None) == "fused" and calls == [cuda_like]
    assert torch.isfinite(norm(torch.randn(1, 5, 8))).all()
    assert calls == [cuda_like]  # a CPU tensor did not take the fused path


def test_fused_refuses_cpu_tensors_without_the_interpreter(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        DynamicTokenNorm(8, 2, method="fused")(torch.randn(1, 4, 8))


def test_traffic_model_counts_the_kernels_passes() -> None:
    """With a one-offset support (no halo) the fused path moves, per activation element: reads of x
    (statistics, forward, both backward kernels) and of grad_y (both backward kernels); writes of y and
    grad_x; plus per-token scalars."""
    B, T, C, H, a = 4, 4096, 512, 8, 2
    read, written = fused.traffic_bytes(B, T, C, H, support=1, itemsize=a, block=64)
    elements = B * T * C
    # per-token scalars (statistics, mask, LayerNorm grads; read by every head's program) add 9% and 7% here
    assert 1 < read / (elements * (4 * a + 2 * a)) < 1.10
    assert 1 < written / (elements * 2 * a) < 1.08
    # the halo of a kernel 15 offsets wide (7 each side): the forward, _backward_rows and the tile's own rows
    # in _backward_sources load 14 more source rows per 64-token tile; _backward_sources also recomputes the
    # 7 output rows on each side that see its tile: their x, statistics, grad_y (+ weight) and 14 more sources
    wide_read, wide_written = fused.traffic_bytes(B, T, C, H, support=15, itemsize=a, block=64)
    D = C // H
    boundaries = B * H * (T // 64 - 1)  # 7 rows fewer at each end of a sequence
    side_block = 21 * (D * a + 1) + 7 * (8 + D * a) + D * 4
    assert wide_written == written
    assert wide_read - read == boundaries * (14 * 3 * (D * a + 1) + 2 * side_block)


_COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lra_dtn.dtn import fused

ints = {"rows_total", "T", "C", "D", "H"}
pointers = {"mask": "*u8"}
for kernel, constants in [
    (fused._ln_stats, dict(BLOCK=fused.BLOCK, BLOCK_D=64)),
    *[(k, dict(HAS_MASK=True, NATS=fused.SUPPORT_NATS, BLOCK=fused.BLOCK, BLOCK_D=64, DOT=fused.DOT_PRECISION))
      for k in (fused._forward, fused._backward_rows, fused._backward_sources)],
]:
    signature = {name: "constexpr" if name in constants else "i32" if name in ints else "fp32" if name == "eps"
                 else pointers.get(name, "*fp32") for name in kernel.arg_names}
    triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=fused.NUM_WARPS, num_stages=fused.NUM_STAGES))
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_a_gpu() -> None:
    """The interpreter accepts code the compiler rejects: compile every kernel for sm_90 (H100/H200) with
    triton's bundled ptxas, which needs no GPU. About 30 s, so not in the default run."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "compiled", done.stderr[-2000:]


@pytest.mark.parametrize("length", [1, 2, 300])
def test_the_host_twin_of_the_support_matches_the_kernels(length: int) -> None:
    """``support_interval`` (host, for reports) against ``_support`` run by the interpreter."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=fused.NOT_SPECIALIZED)
    def support_kernel(weights, out, T):
        i = tl.program_id(0)
        lo, hi = fused._support(tl.load(weights + 2 * i), tl.load(weights + 2 * i + 1), T, fused.SUPPORT_NATS)
        tl.store(out + 2 * i, lo)
        tl.store(out + 2 * i + 1, hi)

    weights = torch.tensor([[0.0, -1.0], [7.0, -1.0], [2000.0, -4.0], [0.0, -40.0], [0.3, -1e-4], [0.0, 0.0],
                            [2.0, 0.0], [-0.5, 0.0], [0.0, 0.3], [-6.0, 0.05], [1e-3, -1e-9]], dtype=torch.float64)
    out = torch.empty(len(weights), 2, dtype=torch.int32)
    support_kernel[(len(weights),)](weights, out, length)
    assert out.tolist() == [list(fused.support_interval(w1, w2, length)) for w1, w2 in weights.tolist()]
    lo, hi = fused.support_interval(0.0, -fused.SUPPORT_NATS / 126**2, 4096)  # benchmarks' wide kernel
    assert (lo, hi) == (-127, 127)
