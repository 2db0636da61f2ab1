"""DTN's fused CPU path (``method="native"``, what ``auto`` takes on CPU): the C kernels of
``lra_dtn/dtn/native.c`` against the dense float64 reference, forward and every gradient.

Each case also asserts *which* code computed it (the ``engines`` fixture records the calls): a plan that
:func:`lra_dtn.dtn.native.serves` must go through the C kernels, and one it leaves to the eager path
(far-peaked, so wide that FFT wins, float64 input, no working compiler) must go there and still be
exact. The cases where the compiler fails build into a fresh cache folder with a fake ``CC``. Shapes are
small, but long and wide enough to cross the kernels' blocks of tokens, channels and offsets, and end in
partial ones.
"""
from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import math
import os
import shutil
import warnings

import pytest
import torch

from lra_dtn.config import Preset
from lra_dtn.dtn import DynamicTokenNorm, DynamicTokenVarNorm, cpu, native
from lra_dtn.dtn.module import PATHS
from lra_dtn.dtn.reference import dense_reference, reference_gradients
from models import build_model
from tasks import TASKS
from test_dtn import masks, randomised

#: The matrix's length: more than two of the kernels' sweeps of 64 tokens, the last one partial.
LENGTH = 150
#: (w1, w2) of logit = w1 * d + w2 * d^2 (jittered 10% per head by ``randomised``), at T = LENGTH: the ones
#: the C kernels serve. Bands (offsets) at seed 3: init 13, sharp 1, shifted 23 (-3 ... 19), wide 241, flat
#: 299 (every offset of the sequence), linear 296 and upward 299 with their peaks at the band's end; none a
#: whole number of the kernels' blocks of 4 or 8 offsets but the sharp one.
NATIVE_KERNELS = {
    "init": None,
    "sharp": (0.0, -40.0),
    "shifted": (8.0, -0.5),  # peak at d = 8, 32 nats above d = 0: within reach of every token
    "wide": (0.0, -2e-3),
    "flat": (0.0, 0.0),
    "linear": (0.2, 0.0),  # w2 = 0: the weights grow across the whole sequence, ~30 nats
    "upward": (0.0, 0.001),  # curving upward, ~23 nats: still every token reaches its peak
}
#: The same form, left to the eager path at T = LENGTH: some head peaks more than DYNAMIC_RANGE above d = 0.
EAGER_KERNELS = {
    "far-shifted": (2000.0, -4.0),
    "shifted-out": (30.0, -1.0),  # peak at d = 15, 225 nats above d = 0
    "steep-linear": (2.0, 0.0),
    "upward": (0.0, 0.3),
    "upward-shifted": (-6.0, 0.05),
    "sharp-far-shifted": (400.0, -40.0),
}


def compiler_found() -> bool:
    """Whether native.build will find a compiler (without one, ``auto`` is the eager path, tested in
    test_dtn.py, and only the build-failure tests below apply)."""
    return bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))


needs_compiler = pytest.mark.skipif(not compiler_found(), reason="no C compiler: the native path cannot be built")


@pytest.fixture
def engines(monkeypatch) -> list[str]:
    """The engines the calls of a test ran on, in order: ``"native"`` (the C kernels) or ``"eager"``
    (:func:`lra_dtn.dtn.cpu.normalize`, where ``native`` leaves a call)."""
    if not compiler_found():
        pytest.skip("no C compiler: the native path cannot be built")
    calls: list[str] = []
    eager, kernels = cpu.normalize, native._NativeFunction.apply
    monkeypatch.setattr(cpu, "normalize", lambda *args, **kwargs: calls.append("eager") or eager(*args, **kwargs))
    monkeypatch.setattr(native._NativeFunction, "apply", lambda *args: calls.append("native") or kernels(*args))
    return calls


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    """An empty ``LRA_DTN_CACHE`` and no loaded library; afterwards the next call loads the usual one."""
    monkeypatch.setenv("LRA_DTN_CACHE", str(tmp_path / "cache"))
    native.build.cache_clear()
    yield tmp_path / "cache"
    native.build.cache_clear()


def compare(norm: DynamicTokenNorm, x: torch.Tensor, mask: torch.Tensor | None, tol: float = 1e-5) -> None:
    """Forward and every gradient (x, pos_proj.weight, gates, weight, bias) of ``norm`` against the dense
    float64 reference, on the real tokens; ``pos_proj.bias`` gets exactly zero. Sequences without a real
    token are left out of the reference (its softmax over no source is NaN) and only need finite values.

    Each error is relative to that tensor's largest reference value, except ``pos_proj.weight``'s, which
    is relative to the largest reference gradient of the problem (as in test_dtn's ``gradient_errors``):
    its true value can be ~0 (a kernel collapsed onto one offset) while float32 rounding of the terms
    ``~ d^2`` that cancel in it remains (at T = 61 up to 2e-5 on the native path, 3e-5 on the eager one)."""
    real = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype) * real[..., None]
    norm.zero_grad()
    leaf = x.clone().requires_grad_()
    y = norm(leaf, mask)
    y.backward(grad_y)
    assert torch.isfinite(y).all() and torch.isfinite(leaf.grad).all()
    keep = real.any(dim=1)
    if not keep.any():
        return
    x, grad_y, real, y, got_x = x[keep], grad_y[keep], real[keep], y[keep], leaf.grad[keep]
    mask = None if mask is None else mask[keep]
    ref, expected = dense_reference(norm, x, mask), reference_gradients(norm, x, mask, grad_y)
    assert (y.double() - ref).abs()[real].max() <= tol * ref.abs()[real].max(), "forward"
    got = {"x": got_x, **{name: p.grad for name, p in norm.named_parameters()}}
    assert got.keys() == expected.keys()
    largest = max(r.abs().max() for r in expected.values())
    for name, value in got.items():
        if name == "pos_proj.bias":  # cancels in the softmax: exactly zero here, rounding noise there
            assert (value == 0).all() and expected[name].abs().max() < 1e-9
            continue
        scale = 5 * largest if name == "pos_proj.weight" else expected[name].abs().max()
        error = (value.double() - expected[name]).abs().max()
        assert error <= tol * scale, (name, error.item(), scale.item())


def module(kernel: tuple[float, float] | None, seed: int, channels: int = 24, heads: int = 4, **kwargs) -> DynamicTokenNorm:
    norm = DynamicTokenNorm(channels, heads, **kwargs)
    return norm if kernel is None else randomised(norm, *kernel, seed=seed)


def tokens(batch: int, length: int, channels: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, length, channels, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3


def served(norm: DynamicTokenNorm, length: int, dtype: torch.dtype = torch.float32) -> bool:
    return native.serves(cpu.make_plan(norm.pos_proj.weight, length, "auto", torch.float32), dtype)


# --------------------------------------------------------------------------------------------------
# 1. The kernel matrix, 2. padding


@pytest.mark.parametrize("method", ["native", "auto"])
@pytest.mark.parametrize("kernel", list(NATIVE_KERNELS))
def test_served_kernels_run_in_c_and_match_the_reference(kernel: str, method: str, engines) -> None:
    norm = module(NATIVE_KERNELS[kernel], seed=3, method=method)
    assert served(norm, LENGTH)
    x = tokens(3, LENGTH, 24)
    for mask in masks(3, LENGTH, seed=3).values():
        compare(norm, x, mask)
    assert engines == ["native"] * 4


@pytest.mark.parametrize("kernel", list(EAGER_KERNELS))
def test_far_peaked_kernels_fall_back_to_the_eager_path(kernel: str, engines) -> None:
    norm = module(EAGER_KERNELS[kernel], seed=3, method="native")
    assert cpu.make_plan(norm.pos_proj.weight, LENGTH, "auto", torch.float32).far
    x = tokens(3, LENGTH, 24)
    for mask in masks(3, LENGTH, seed=3).values():
        compare(norm, x, mask)
    assert engines == ["eager"] * 4


def test_a_kernel_so_wide_that_fft_wins_falls_back_to_the_eager_path(engines) -> None:
    norm = module((0.0, 0.0), seed=1, channels=8, heads=2, method="native")  # flat: 2047 offsets at T = 1024
    assert cpu.make_plan(norm.pos_proj.weight, 1024, "auto", torch.float32).method == "fft"
    mask = torch.arange(1024)[None] < torch.tensor([[1024], [700]])
    compare(norm, tokens(2, 1024, 8), mask)
    assert engines == ["eager"]


def test_the_widest_band_short_of_fft_runs_in_c(engines) -> None:
    """A flat kernel at T = 300: 599 offsets, just below where the eager path would take FFT."""
    norm = module((0.0, 0.0), seed=2, method="native")
    plan = cpu.make_plan(norm.pos_proj.weight, 300, "auto", torch.float32)
    assert plan.method == "conv" and plan.width == 599
    compare(norm, tokens(2, 300, 24, seed=2), torch.arange(300)[None] < torch.tensor([[300], [100]]))
    assert engines == ["native"]


def test_no_mask_and_an_all_true_mask_give_identical_results(engines) -> None:
    norm = module((0.3, -0.05), seed=2)
    x = tokens(3, 40, 24, seed=2)
    results = []
    for mask in (None, torch.ones(3, 40, dtype=torch.bool)):
        leaf = x.clone().requires_grad_()
        y = norm(leaf, mask)
        results.append([y, *torch.autograd.grad(y.square().sum(), [leaf, *norm.parameters()])])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert engines == ["native"] * 2


@pytest.mark.parametrize("kernel", ["init", "wide"])
def test_real_tokens_do_not_depend_on_the_padding(kernel: str, engines) -> None:
    """The same sequences alone and with 50 more padded tokens of arbitrary content (and a third sequence
    with no real token at all): the real tokens' outputs and every gradient agree; the padding's outputs
    are finite and the extra tokens get exactly zero gradient."""
    norm = module(NATIVE_KERNELS[kernel], seed=7)
    lengths = torch.tensor([30, 12, 0])
    x = tokens(3, 30, 24, seed=7)
    grad_y = torch.randn(3, 30, 24, generator=torch.Generator().manual_seed(8)) * (torch.arange(30) < lengths[:, None])[..., None]
    grads = []
    for extra in (0, 50):
        leaf = torch.cat([x, 1e3 * torch.randn(3, extra, 24)], dim=1).requires_grad_()
        mask = torch.arange(30 + extra)[None] < lengths[:, None]
        y = norm(leaf, mask)
        assert torch.isfinite(y).all()
        grads.append([y[:, :30], *torch.autograd.grad((y[:, :30] * grad_y).sum(), [leaf, *norm.parameters()])])
        assert (grads[-1][1][:, 30:] == 0).all()  # the extra padding influences nothing
        assert all(torch.isfinite(g).all() for g in grads[-1])
    (y_alone, gx_alone, *params_alone), (y_padded, gx_padded, *params_padded) = grads
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(y_padded[b, :n], y_alone[b, :n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_padded[:, :30], gx_alone, rtol=1e-4, atol=1e-5)
    for alone, padded in zip(params_alone, params_padded):
        torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)
    assert engines == ["native"] * 2


def test_infinite_padding_reaches_no_real_token(engines) -> None:
    """Padded tokens holding inf or NaN: the real tokens' outputs and gradients are those of finite padding
    (the C kernels select a pad's values away instead of multiplying them by 0)."""
    norm = module((0.3, -0.05), seed=4)
    x = tokens(2, 40, 24, seed=4)
    mask = torch.arange(40)[None] < torch.tensor([[40], [25]])
    results = []
    for pad in (0.0, math.inf, math.nan):
        leaf = x.masked_fill(~mask[..., None], pad).requires_grad_()
        y = norm(leaf, mask)
        grads = torch.autograd.grad((y * mask[..., None]).square().sum(), [leaf, *norm.parameters()])
        results.append((y[mask], grads[0][mask]))
    for y, grad_x in results[1:]:
        assert torch.equal(y, results[0][0]) and torch.equal(grad_x, results[0][1])
    assert engines == ["native"] * 3


# --------------------------------------------------------------------------------------------------
# 3. Edge shapes and dtn_var


@pytest.mark.parametrize("shape", [(0, 12, 24), (2, 0, 24)])
@pytest.mark.parametrize("method", ["native", "conv"])
def test_an_empty_batch_or_sequence_gives_an_empty_output_and_zero_gradients(shape, method: str) -> None:
    norm = module((0.3, -0.05), seed=1, method=method)
    x = torch.randn(shape, requires_grad=True)
    y = norm(x, torch.ones(shape[:2], dtype=torch.bool))
    assert y.shape == shape
    y.sum().backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in norm.parameters())


@pytest.mark.parametrize("norm_class", [DynamicTokenNorm, DynamicTokenVarNorm])
def test_non_reentrant_checkpointing_gives_the_plain_gradients(norm_class, engines) -> None:
    """Under saved-tensor hooks (here: non-reentrant activation checkpointing, which recomputes them) the
    backward gets new tensors: it must read those, not forward's (they are freed by then)."""
    norm = norm_class(24, 4, method="native")
    with torch.no_grad():
        norm.pos_proj.weight.add_(0.01)
        norm.gate_var.fill_(0.3)
    x = tokens(2, 70, 24, seed=5)
    mask = torch.arange(70)[None] < torch.tensor([[70], [33]])
    grads = []
    for run in (lambda v: norm(v, mask), lambda v: torch.utils.checkpoint.checkpoint(norm, v, mask, use_reentrant=False)):
        leaf = x.clone().requires_grad_()
        grads.append(torch.autograd.grad(run(leaf).square().sum(), [leaf, *(p for p in norm.parameters())]))
    for plain, checkpointed in zip(*grads):
        assert torch.equal(plain, checkpointed)


@pytest.mark.parametrize("length", [1, 2])
def test_one_and_two_token_sequences(length: int, engines) -> None:
    """Every kernel is served at these lengths but the far-shifted one at T = 2 (d = 1 is 1996 nats above
    d = 0); masks: none, one real token at the end, a sequence with no real token."""
    cases = {None: "native", (0.0, -40.0): "native", (30.0, -1.0): "native",
             (2000.0, -4.0): "native" if length == 1 else "eager"}
    mask = torch.tensor([[True] * length, [False] * (length - 1) + [True], [False] * length])
    for seed, (kernel, engine) in enumerate(cases.items()):
        norm = module(kernel, seed=seed, method="native")
        x = tokens(3, length, 24, seed=seed)
        engines.clear()
        compare(norm, x, None)
        compare(norm, x, mask)
        assert engines == [engine] * 2, kernel


@pytest.mark.parametrize("channels, heads", [(24, 4), (40, 2), (51, 3), (6, 3), (2, 1), (96, 8)])
def test_channel_counts_with_and_without_a_partial_vector_block(channels: int, heads: int, engines) -> None:
    """One build per channel and head count, whose loops run over blocks of 8 or 16 channels (AVX2 or
    AVX-512), padded: 24, 40 and 51 end in a partial block, 6 and 2 are less than one (2: one head of 2
    channels, the least DTN takes), 96 is whole blocks; head widths 6, 20, 17, 2, 2, 12. T = 100: a sweep
    of 64 tokens and a partial one."""
    norm = module((0.3, -0.05), seed=channels, channels=channels, heads=heads, method="native")
    x = tokens(2, 100, channels, seed=channels)
    compare(norm, x, torch.arange(100)[None] < torch.tensor([[100], [70]]))
    compare(norm, x, torch.rand(2, 100, generator=torch.Generator().manual_seed(channels)) < 0.6)
    assert engines == ["native"] * 2


def test_dtn_var_has_no_mean_gate_and_matches_the_reference(engines) -> None:
    norm = randomised(DynamicTokenVarNorm(24, 4, method="native"), 0.3, -0.05, seed=4)
    assert norm.gate_mean is None and "gate_mean" not in dict(norm.named_parameters())
    x = tokens(3, 41, 24, seed=4)
    for mask in masks(3, 41, seed=4).values():
        compare(norm, x, mask)  # every parameter it has, and no gate_mean gradient in the reference either
    assert engines == ["native"] * 4


def test_non_contiguous_inputs_give_the_same_numbers(engines) -> None:
    """Strided tokens, mask and output gradient: the same bits as their contiguous copies."""
    norm = module((0.3, -0.05), seed=5)
    base = tokens(2, 40, 48, seed=5).requires_grad_()
    mask = (torch.arange(40)[None] < torch.tensor([[40], [25]])).t().contiguous().t()
    grad_y = torch.randn(2, 24, 40).transpose(1, 2)
    y = norm(base[:, :, ::2], mask)
    grad_base, *grad_params = torch.autograd.grad(y, [base, *norm.parameters()], grad_y)
    assert (grad_base[:, :, 1::2] == 0).all()
    dense = base.detach()[:, :, ::2].contiguous().requires_grad_()
    y_dense = norm(dense, mask.contiguous())
    expected = torch.autograd.grad(y_dense, [dense, *norm.parameters()], grad_y.contiguous())
    for a, b in zip([y, grad_base[:, :, ::2], *grad_params], [y_dense, *expected]):
        assert torch.equal(a, b)
    assert engines == ["native"] * 2


# --------------------------------------------------------------------------------------------------
# 4. Dtypes, 5. threads


def test_bf16_autocast_computes_in_float32_and_rounds_only_the_results(engines) -> None:
    """Under bf16 autocast the kernels read the bf16 tokens and output gradient in float32: the output and
    the input gradient are the float32 call's, rounded to bf16, and the parameter gradients are the float32
    call's exactly (the float32 numbers are held to the reference above). The tokens have a large mean and a
    small spread, where E[x^2] - E[x]^2 in bf16 would cancel to nothing."""
    norm = module((0.1, -0.01), seed=2, channels=32, heads=4)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 64, 32, generator=g) * 0.5 + 20).bfloat16()
    grad_y = torch.randn(2, 64, 32, generator=g).bfloat16()
    mask = torch.arange(64)[None] < torch.tensor([[64], [40]])
    leaf = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(leaf, mask)
    grad_x, *grad_params = torch.autograd.grad(y, [leaf, *norm.parameters()], grad_y)
    assert y.dtype == grad_x.dtype == torch.bfloat16
    leaf32 = x.float().requires_grad_()
    y32 = norm(leaf32, mask)
    grad_x32, *grad_params32 = torch.autograd.grad(y32, [leaf32, *norm.parameters()], grad_y.float())
    assert torch.equal(y, y32.bfloat16()) and torch.equal(grad_x, grad_x32.bfloat16())
    for a, b in zip(grad_params, grad_params32):
        assert torch.equal(a, b)
    assert engines == ["native"] * 2


def test_float64_inputs_keep_float64_statistics_on_the_eager_path(engines) -> None:
    norm = module((0.3, -0.05), seed=6, method="native").double()
    assert served(norm, 41)  # the plan is the kernels' kind: only the dtype sends it to the eager path
    x = tokens(3, 41, 24, seed=6).double()
    compare(norm, x, masks(3, 41, seed=6)["prefix"], tol=1e-10)
    assert engines == ["eager"]


def test_the_numbers_do_not_depend_on_the_thread_count(engines) -> None:
    """Sequences are split between threads and each writes its own row of parameter gradients, summed in
    batch order: 1 or 2 threads, forward and backward on either, give the same bits."""
    norm = module((0.0, -2e-3), seed=9, channels=40, heads=2)  # wide: 241 offsets
    x = tokens(5, LENGTH, 40, seed=9)
    mask = masks(5, LENGTH, seed=9)["scattered"]
    grad_y = torch.randn(5, LENGTH, 40, generator=torch.Generator().manual_seed(9))
    before = torch.get_num_threads()

    def run(forward_threads: int, backward_threads: int) -> list[torch.Tensor]:
        torch.set_num_threads(forward_threads)
        leaf = x.clone().requires_grad_()
        y = norm(leaf, mask)
        torch.set_num_threads(backward_threads)
        return [y, *torch.autograd.grad(y, [leaf, *norm.parameters()], grad_y)]

    try:
        expected = run(1, 1)
        for threads in ((2, 2), (2, 1), (1, 2)):
            for a, b in zip(run(*threads), expected):
                assert torch.equal(a, b), threads
    finally:
        torch.set_num_threads(before)
    assert engines == ["native"] * 4


def test_concurrent_calls_from_two_threads_give_each_its_own_numbers(engines) -> None:
    """Each calling thread has its own workspace (reused from call to call): two Python threads running
    forward + backward at the same time, on different shapes, get what they get alone."""
    cases = [(module((0.3, -0.05), seed=seed), tokens(4, length, 24, seed=seed)) for seed, length in ((0, 600), (1, 500))]

    def run(norm: DynamicTokenNorm, x: torch.Tensor) -> list[torch.Tensor]:
        leaf = x.clone().requires_grad_()
        y = norm(leaf, None)
        return [y, *torch.autograd.grad(y.square().sum(), [leaf, *norm.parameters()])]

    expected = [run(*case) for case in cases]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(lambda case=case: [run(*case) for _ in range(5)]) for case in cases]
        for future, want in zip(futures, expected):
            for got in future.result():
                assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert engines.count("native") == 12


# --------------------------------------------------------------------------------------------------
# 6. Building the kernels


def test_a_double_backward_raises_instead_of_going_wrong(engines) -> None:
    """The C backward is not itself differentiable: a second-order gradient is an error, not a silent 0."""
    norm = module((0.3, -0.05), seed=1)
    x = tokens(2, 30, 24, seed=1).requires_grad_()
    (grad_x,) = torch.autograd.grad(norm(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_x.sum().backward()
    assert engines == ["native"]


def test_native_refuses_tensors_off_the_cpu() -> None:
    with pytest.raises(RuntimeError, match="runs on CPU tensors; got a meta tensor"):
        DynamicTokenNorm(8, 2, method="native")(torch.empty(1, 5, 8, device="meta"))


def failing_compiler(kind: str, folder) -> str:
    """``CC`` for a compiler that does not work: one that answers ``--version`` and then fails every
    compilation, one that fails even that (``false``), one that does not exist."""
    if kind == "fails":
        script = folder / "cc"
        script.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'broken cc 1.0' && exit 0\n"
                          "echo 'broken cc: cannot compile' >&2\nexit 1\n")
        script.chmod(0o755)
        return str(script)
    return {"false": shutil.which("false") or "false", "missing": str(folder / "no-such-cc")}[kind]


@pytest.mark.parametrize("kind, message", [
    ("fails", r"could not build native\.c:\n.*broken cc: cannot compile"),
    ("false", "does not run"),
    ("missing", "does not run"),
])
def test_without_a_working_compiler_native_raises_and_auto_warns_and_stays_exact(
        kind: str, message: str, fresh_cache, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CC", failing_compiler(kind, tmp_path))
    norm = module((0.3, -0.05), seed=1, method="native")
    x = tokens(2, 30, 24, seed=1)
    mask = torch.arange(30)[None] < torch.tensor([[30], [11]])
    with pytest.raises(native.NativeUnavailable, match=message):
        norm(x, mask)
    assert not native.available(24, 4)
    norm.method = "auto"
    with pytest.warns(UserWarning, match="C kernels are unavailable, using the eager path"):
        y = norm(x, mask)
    assert torch.equal(y, PATHS.get("conv")(norm, x, mask))
    with pytest.warns(UserWarning, match="unavailable"):
        compare(norm, x, mask)
    assert not fresh_cache.exists() or not any(fresh_cache.iterdir())  # nothing half-written left behind


def test_a_failed_build_is_not_retried_on_every_call(fresh_cache, monkeypatch, tmp_path) -> None:
    """Where the kernels cannot be built, ``auto`` falls back to the eager path at the eager path's cost:
    the compiler is not run again on the next call (a training step makes one call per norm)."""
    monkeypatch.setenv("CC", failing_compiler("fails", tmp_path))
    norm = module((0.3, -0.05), seed=1)
    x = tokens(2, 30, 24, seed=1)
    with pytest.warns(UserWarning, match="unavailable"):
        norm(x)
    commands = []
    run = native.subprocess.run
    monkeypatch.setattr(native.subprocess, "run", lambda command, **kw: commands.append(command) or run(command, **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        norm(x)
    assert commands == []


@needs_compiler
def test_a_build_writes_one_library_atomically_and_the_next_process_reuses_it(fresh_cache, monkeypatch) -> None:
    native.library(24, 4)
    (built,) = fresh_cache.iterdir()  # exactly one file: no temporary left beside it
    assert built.name.startswith("dtn-c24-h4-") and built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    native.build.cache_clear()  # as a new process would
    commands = []
    run = native.subprocess.run
    monkeypatch.setattr(native.subprocess, "run", lambda command, **kw: commands.append(command) or run(command, **kw))
    norm = module((0.3, -0.05), seed=1, method="native")
    x = tokens(2, 30, 24, seed=1)
    compare(norm, x, None)
    assert [command[1:] for command in commands] == [["--version"]]  # asked its version, compiled nothing
    assert list(fresh_cache.iterdir()) == [built] and built.stat().st_mtime_ns == stamp


@needs_compiler
def test_a_compiler_command_with_arguments_builds(fresh_cache, monkeypatch) -> None:
    """``CC`` is a command line (``ccache gcc``, ``gcc -m64``), split as a shell would."""
    monkeypatch.setenv("CC", f"{shutil.which('cc') or shutil.which('gcc')} -m64")
    norm = module((0.3, -0.05), seed=1, method="native")
    compare(norm, tokens(2, 30, 24, seed=1), None)
    assert len(list(fresh_cache.iterdir())) == 1


@needs_compiler
def test_the_library_is_rebuilt_when_the_compiler_flags_change(fresh_cache, monkeypatch) -> None:
    """A library built with other flags is another library: a cache keyed without some flag would keep
    loading the old build after that flag changed."""
    native.library(24, 4)
    first = set(fresh_cache.iterdir())
    native.build.cache_clear()
    monkeypatch.setattr(native, "COMMON_FLAGS", [*native.COMMON_FLAGS, "-DLRA_DTN_TEST_FLAG"])
    native.library(24, 4)
    assert len(set(fresh_cache.iterdir()) - first) == 1


# --------------------------------------------------------------------------------------------------
# Conditioning


@needs_compiler
@pytest.mark.parametrize("method", ["conv", "native"])
@pytest.mark.parametrize("kernel, mask_kind", [((0.0, -40.0), "none"), ((0.0, 0.0), "one")])
def test_a_token_that_is_its_own_only_source_is_exactly_centred(kernel, mask_kind: str, method: str) -> None:
    """Gates at -inf (only the inter-token statistics) and a token whose window holds only itself (a sharp
    kernel, or the one real token of a sequence under a flat kernel): its mean is its own xs, exactly
    representable, so ``xs - mean`` is exactly 0 and the output exactly ``bias``. Rounding here is divided
    by ``sqrt(var + eps) ~ sqrt(eps)``: any difference between the xs of the two terms shows ~300-fold."""
    norm = randomised(DynamicTokenNorm(24, 4, method=method), *kernel, seed=1)
    with torch.no_grad():
        norm.gate_mean.fill_(-math.inf)
        norm.gate_var.fill_(-math.inf)
    x = tokens(3, 40, 24, seed=1)
    real = torch.ones(3, 40, dtype=torch.bool)
    if mask_kind == "one":
        real = torch.zeros(3, 40, dtype=torch.bool)
        real[torch.arange(3), torch.tensor([0, 17, 39])] = True
    y = norm(x, None if mask_kind == "none" else real)
    assert torch.equal(y[real], norm.bias.detach().expand(int(real.sum()), 24))


# --------------------------------------------------------------------------------------------------
# The mask's dtype


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float32])
def test_a_zero_one_mask_of_any_dtype_means_what_the_boolean_one_does(dtype: torch.dtype, engines) -> None:
    """Norms take ``mask`` as "true for real tokens" (lra_dtn/norms.py); the eager path and ``in`` convert it
    with ``mask.to(dtype)``."""
    norm = module((0.3, -0.05), seed=3)
    x = tokens(2, 30, 24, seed=3)
    mask = torch.arange(30)[None] < torch.tensor([[30], [11]])
    assert torch.equal(norm(x, mask.to(dtype)), norm(x, mask))


# --------------------------------------------------------------------------------------------------
# 7. Training


def test_a_model_trains_the_same_on_the_native_and_on_the_eager_path(engines) -> None:
    """The smoke ListOps Transformer with DTN (no dropout), a few Adam steps on one padded batch: ``auto``
    (native on CPU) and every DTN forced to the eager ``conv`` give the same losses, and they go down."""
    cfg = dataclasses.replace(TASKS.get("listops")().spec(Preset.smoke, "transformer")[0], dropout=0.0,
                              attn_dropout=0.0)
    torch.manual_seed(0)
    model = build_model("transformer", cfg, "dtn")
    eager = copy.deepcopy(model)
    norms = [m for m in eager.modules() if isinstance(m, DynamicTokenNorm)]
    assert len(norms) == 2 * cfg.num_layers + 1  # two per block and the final one
    for norm in norms:
        norm.method = "conv"
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(cfg.max_len)[None] < torch.tensor([cfg.max_len, 31, 17, 5])[:, None]
    ids = torch.randint(1, cfg.vocab_size, (4, cfg.max_len), generator=g) * mask
    labels = torch.randint(0, cfg.num_classes, (4,), generator=g)

    def losses(model: torch.nn.Module, steps: int = 6) -> list[float]:
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        out = []
        for _ in range(steps):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(ids, mask), labels)
            loss.backward()
            optimizer.step()
            out.append(loss.item())
        return out

    native_losses = losses(model.train())
    assert engines == ["native"] * 6 * len(norms)
    eager_losses = losses(eager.train())
    assert engines == ["native"] * 6 * len(norms)  # "conv" is the eager path's own entry
    assert native_losses[-1] < native_losses[0] - 0.1, native_losses
    assert native_losses == pytest.approx(eager_losses, abs=1e-5), (native_losses, eager_losses)
