"""Dynamic Token Normalization against the dense float64 reference of the spec (specs/dtn.md)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

from lra_dtn.dtn import DynamicTokenNorm, DynamicTokenVarNorm, cpu, local_offsets
from lra_dtn.dtn.reference import dense_reference, reference, reference_gradients
from lra_dtn.norms import NORMS, InstanceNorm, Norm, build_norm

#: ``auto`` is the native path on CPU (the C kernels, or the eager path for the plans they leave to it, or
#: where no compiler builds them); test_dtn_native.py holds it to the reference in detail, and records
#: which engine ran. Tests here that once ran ``auto`` for the eager path run ``conv`` beside it.
METHODS = ("conv", "fft", "auto")


def randomised(norm: DynamicTokenNorm, w1: float, w2: float, seed: int = 0) -> DynamicTokenNorm:
    """Random gates and affine; per-head kernel ``w1 * d + w2 * d^2``, jittered by 10% per head."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (norm.gate_mean, norm.gate_var, norm.bias):
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=g))
        norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g))
        jitter = 1 + 0.1 * torch.randn(norm.num_heads, generator=g)
        norm.pos_proj.weight[:, 0] = w1 * jitter
        norm.pos_proj.weight[:, 1] = w2 * jitter
        norm.pos_proj.bias.normal_(generator=g)  # cancels in the softmax
    return norm


def masks(batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.arange(length)[None] < torch.randint(1, length + 1, (batch,), generator=g)[:, None]
    scattered = torch.rand(batch, length, generator=g) < 0.5
    one = torch.zeros(batch, length, dtype=torch.bool)
    one[torch.arange(batch), torch.randint(0, length, (batch,), generator=g)] = True
    return {"none": None, "prefix": prefix, "scattered": scattered, "all-but-one": one}


def relative_error(y: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None) -> float:
    real = torch.ones(y.shape[:2], dtype=torch.bool) if mask is None else mask
    if not real.any():
        return 0.0
    return ((y.double() - ref).abs()[real].max() / ref.abs()[real].max()).item()


KERNELS = {  # (w1, w2) of logit = w1 * d + w2 * d^2
    "init": None,
    "sharp": (0.0, -40.0),
    "wide": (0.02, -2e-3),
    "flat": (0.0, 0.0),
    "shifted": (30.0, -1.0),  # peak at d = 15, outside short sequences
    "far-shifted": (2000.0, -4.0),  # peak at d = 250: the per-token shift is needed
    "linear": (2.0, 0.0),  # grows without bound across the sequence
    "upward": (0.0, 0.3),  # inverted: the farthest tokens dominate
    "upward-shifted": (-6.0, 0.05),
    "sharp-far-shifted": (400.0, -40.0),  # peak at d = 5, every other offset 40 nats lower
}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of one or two sequences, so the chunked passes are exercised at test sizes."""
    monkeypatch.setattr(cpu, "CHUNK_TOKENS", 48)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_every_path_matches_the_dense_reference(method: str, kernel: str, small_chunks) -> None:
    for seed, length in enumerate((1, 2, 61)):
        norm = DynamicTokenNorm(24, 4, method=method)
        if KERNELS[kernel] is not None:
            randomised(norm, *KERNELS[kernel], seed=seed)
        x = torch.randn(3, length, 24, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3
        for name, mask in masks(3, length, seed).items():
            y = norm(x, mask)
            assert torch.isfinite(y).all(), (kernel, length, name)
            err = relative_error(y, dense_reference(norm, x, mask), mask)
            assert err < 1e-5, (kernel, length, name, err)


def test_auto_convolves_at_init_and_uses_fft_for_the_widest_kernels() -> None:
    norm = DynamicTokenNorm(32, 4)
    plan = cpu.make_plan(norm.pos_proj.weight, 1024, "auto", torch.float32)
    assert plan.method == "conv" and plan.width == 15  # offsets -7 ... 7: heads at -1.5 ... 1.5
    randomised(norm, 0.0, 0.0)  # flat: every offset of the sequence counts
    plan = cpu.make_plan(norm.pos_proj.weight, 1024, "auto", torch.float32)
    assert plan.method == "fft" and plan.width == 2047
    randomised(norm, 3000.0, -5.0)  # far peak: FFT rounding could swamp some tokens' weights
    assert cpu.make_plan(norm.pos_proj.weight, 1024, "fft", torch.float32).method == "conv"


def test_long_sequences_match_the_reference() -> None:
    norm = randomised(DynamicTokenNorm(16, 4), 0.3, -0.02, seed=3)
    x = torch.randn(2, 700, 16)
    mask = torch.arange(700)[None] < torch.tensor([[700], [333]])
    for method in ("conv", "fft"):
        norm.method = method
        assert relative_error(norm(x, mask), dense_reference(norm, x, mask), mask) < 1e-5


@pytest.mark.parametrize("method", ("conv", "auto"))
def test_dtn_var_keeps_the_layernorm_mean(method: str) -> None:
    norm = randomised(DynamicTokenVarNorm(16, 2, method=method), 0.5, -0.3)
    assert norm.gate_mean is None and NORMS.get("dtn_var") is DynamicTokenVarNorm
    x = torch.randn(2, 30, 16)
    mask = torch.arange(30)[None] < torch.tensor([[30], [11]])
    assert relative_error(norm(x, mask), dense_reference(norm, x, mask), mask) < 1e-5


def float64_case(method: str, w1: float, w2: float, mask_kind: str, only_var: bool = False):
    """A small float64 problem: the module, its parameters as leaves, the inputs and the mask."""
    norm = randomised(DynamicTokenNorm(8, 2, method=method, only_var=only_var), w1, w2).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 8, dtype=torch.float64, generator=g)
    mask = {
        "none": None,
        "prefix": torch.arange(9)[None] < torch.tensor([[9], [4]]),
        "scattered": torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0, 1], [0, 0, 0, 1, 0, 0, 0, 0, 0]], dtype=torch.bool),
    }[mask_kind]
    params = {k: v.detach().clone() for k, v in norm.named_parameters()}
    return norm, params, x, mask


@pytest.mark.parametrize(
    "method, w1, w2, mask_kind, only_var",
    [
        ("conv", 1.0, -1.0, "prefix", False),
        ("fft", 0.2, -0.1, "scattered", False),
        ("conv", 0.3, -0.2, "none", True),
        ("conv", 90.0, -1.0, "prefix", False),  # far peak: the exact per-token rows
        ("conv", 0.0, 2.0, "scattered", False),  # upward
    ],
)
def test_gradcheck_float64(method: str, w1: float, w2: float, mask_kind: str, only_var: bool, monkeypatch) -> None:
    monkeypatch.setattr(cpu, "CHUNK_TOKENS", 8)  # one sequence per chunk
    norm, params, x, mask = float64_case(method, w1, w2, mask_kind, only_var)
    names = [k for k in params if k != "pos_proj.bias"]  # the bias cancels: its gradient is ~0

    def f(x, *leaves):
        return functional_call(norm, {**params, **dict(zip(names, leaves))}, (x, mask))

    leaves = [params[k].requires_grad_() for k in names]
    assert torch.autograd.gradcheck(f, (x.requires_grad_(), *leaves), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("method", ("conv", "fft", "auto"))
def test_float32_gradients_match_the_reference(method: str, small_chunks) -> None:
    norm = randomised(DynamicTokenNorm(16, 4, method=method), 0.2, -0.05, seed=5)
    x = torch.randn(3, 40, 16)
    mask = torch.arange(40)[None] < torch.tensor([[40], [17], [1]])
    grad_y = torch.randn(3, 40, 16) * mask[..., None]
    x32 = x.clone().requires_grad_()
    norm(x32, mask).backward(grad_y)
    params = {name: p.detach().double().requires_grad_() for name, p in norm.named_parameters()}
    x64 = x.double().requires_grad_()
    reference(params, x64, mask, 4, norm.eps).backward(grad_y.double())
    assert (x32.grad.double() - x64.grad).abs().max() < 1e-5 * x64.grad.abs().max()
    for name, p in norm.named_parameters():
        ref = params[name].grad
        if name == "pos_proj.bias":  # cancels in the softmax: exactly zero here, rounding noise there
            assert (p.grad == 0).all() and ref.abs().max() < 1e-9
            continue
        assert (p.grad.double() - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-7, name


def gradient_errors(norm: DynamicTokenNorm, x: torch.Tensor, mask: torch.Tensor | None, grad_y: torch.Tensor,
                    autocast: bool = False) -> dict[str, float]:
    """Per gradient (``x`` and every parameter): its largest error against the dense float64 reference,
    relative to the largest reference gradient of the whole problem (normwise: a gradient that is truly
    ~0, such as ``pos_proj``'s of a collapsed kernel, must come out as small as float32 rounding of the
    others, not rounding amplified by ``d^2``). Padded tokens get no output gradient (their outputs are
    only required to be finite, spec); sequences without a real token are left out (the reference's
    softmax over no source is NaN; the module's finite output there is tested below)."""
    if mask is not None:
        keep = mask.any(dim=1)
        x, mask, grad_y = x[keep], mask[keep], grad_y[keep] * mask[keep, :, None]
    leaf = x.detach().clone().requires_grad_()
    norm.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = norm(leaf, mask)
    y.backward(grad_y.to(y.dtype))
    got = {"x": leaf.grad, **{name: p.grad for name, p in norm.named_parameters()}}
    ref = reference_gradients(norm, x, mask, grad_y)
    largest = max(r.abs().max().item() for r in ref.values())
    return {name: (got[name].double() - ref[name]).abs().max().item() / largest for name in ref}


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_every_gradient_matches_the_dense_reference(kernel: str, small_chunks) -> None:
    """Forward is above; here x, pos_proj, gates, weight and bias, for every kernel, length and padding,
    on the convolution and (where it engages) the FFT engine."""
    for seed, length in enumerate((1, 2, 61)):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(3, length, 24, generator=g) * 2 + 0.3
        grad_y = torch.randn(3, length, 24, generator=g)
        for method in ("conv", "fft"):
            norm = DynamicTokenNorm(24, 4, method=method)
            if KERNELS[kernel] is not None:
                randomised(norm, *KERNELS[kernel], seed=seed)
            if cpu.make_plan(norm.pos_proj.weight, length, method, torch.float32).method != method:
                continue  # the FFT engine declined: the same convolution as above
            for name, mask in masks(3, length, seed).items():
                errors = gradient_errors(norm, x, mask, grad_y)
                assert max(errors.values()) < 1e-5, (kernel, method, length, name, errors)


@pytest.mark.parametrize("length, rows, batch", [
    (300, [[0.0, 0.5], [0.1, 0.5]], 2),  # was: pos_proj gradient up to 56 for a true ~1e-50
    (2048, [[0.0, 0.038], [-0.01, 0.038]], 1),  # was: -0.54 for a true ~1e-27 (the authors' dense code agrees)
])
def test_a_collapsed_upward_kernel_gets_its_true_pos_proj_gradient(length: int, rows, batch: int) -> None:
    """``w2 > 0``: every token's softmax collapses onto its farthest source, ``|d|`` up to ``T - 1``; the
    moment-form backward used to cancel float32 terms of size ``d^2`` there (see
    :func:`lra_dtn.dtn.kernel.centred_features`)."""
    norm = randomised(DynamicTokenNorm(8, 2), 0.0, 0.0, seed=4)
    with torch.no_grad():
        norm.pos_proj.weight.copy_(torch.tensor(rows))
    g = torch.Generator().manual_seed(4)
    x, grad_y = torch.randn(batch, length, 8, generator=g), torch.randn(batch, length, 8, generator=g)
    mask = torch.arange(length)[None] < torch.tensor([length, length * 2 // 3][:batch])[:, None]
    errors = gradient_errors(norm, x, mask, grad_y)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("method", ("conv", "auto"))
def test_bf16_autocast_gradients_match_the_dense_reference(method: str) -> None:
    """bf16 tokens and output gradients, float32 statistics: the parameter gradients are float32-exact
    (bf16 inputs are exact in float32); the input gradient comes back in bf16 (rounding ~4e-3)."""
    norm = randomised(DynamicTokenNorm(32, 4, method=method), 0.1, -0.01, seed=2)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 64, 32, generator=g) + 0.3).bfloat16()
    grad_y = torch.randn(2, 64, 32, generator=g).bfloat16()
    mask = torch.arange(64)[None] < torch.tensor([[64], [40]])
    errors = gradient_errors(norm, x, mask, grad_y, autocast=True)
    assert errors.pop("x") < 1e-2 and max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("method", ("conv", "auto"))
def test_a_second_backward_recomputes_the_same_gradients(method: str) -> None:
    norm = randomised(DynamicTokenNorm(16, 4, method=method), 0.5, -0.2)
    x = torch.randn(2, 30, 16, requires_grad=True)
    y = norm(x, torch.arange(30)[None] < torch.tensor([[30], [12]]))
    first = torch.autograd.grad(y.square().sum(), [x, *norm.parameters()], retain_graph=True)
    norm(torch.randn(2, 30, 16))  # another call in between reuses the workspace
    second = torch.autograd.grad(y.square().sum(), [x, *norm.parameters()])
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def rms_prescaled(x: torch.Tensor, heads: int, eps: float = 1e-5) -> torch.Tensor:
    B, T, C = x.shape
    xh = x.view(B, T, heads, C // heads)
    return (xh / torch.sqrt(xh.square().mean(-1, keepdim=True) + eps)).reshape(B, T, C)


@pytest.mark.parametrize("method", ("conv", "fft", "auto"))
def test_gates_at_plus_infinity_give_layernorm_of_the_prescaled_input(method: str) -> None:
    norm = randomised(DynamicTokenNorm(32, 4, method=method), 0.7, -0.4)
    with torch.no_grad():
        norm.gate_mean.fill_(math.inf)
        norm.gate_var.fill_(math.inf)
    x = torch.randn(2, 50, 32) * 3 + 1
    mask = torch.arange(50)[None] < torch.tensor([[50], [20]])
    xs = rms_prescaled(x, 4)
    # LayerNorm with the *unbiased* variance (torch.var's default, as in the authors' code)
    expected = (xs - xs.mean(-1, keepdim=True)) / torch.sqrt(xs.var(-1, keepdim=True) + 1e-5)
    expected = expected * norm.weight + norm.bias
    torch.testing.assert_close(norm(x, mask), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ("conv", "fft", "auto"))
def test_flat_kernel_and_gates_at_minus_infinity_give_masked_instance_norm(method: str) -> None:
    norm = DynamicTokenNorm(32, 4, method=method)
    instance = InstanceNorm(32, 4)
    with torch.no_grad():
        norm.pos_proj.weight.zero_()
        norm.gate_mean.fill_(-math.inf)
        norm.gate_var.fill_(-math.inf)
        norm.weight.normal_()
        instance.weight.copy_(norm.weight)
    x = torch.randn(3, 80, 32) * 2 - 1
    mask = torch.arange(80)[None] < torch.tensor([[80], [45], [1]])
    real = mask[..., None]
    expected = instance(rms_prescaled(x, 4), mask)
    torch.testing.assert_close(norm(x, mask) * real, expected * real, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ("conv", "fft", "auto"))
def test_padding_never_reaches_real_tokens(method: str, small_chunks) -> None:
    norm = randomised(DynamicTokenNorm(16, 4, method=method), 0.4, -0.01, seed=7)
    x = torch.randn(2, 30, 16, requires_grad=True)
    lengths = torch.tensor([30, 12])
    grad_y = torch.randn(2, 30, 16)
    y = norm(x, torch.arange(30)[None] < lengths[:, None])
    (y * grad_y).sum().backward()
    # the same sequences with 50 more padded tokens of arbitrary content
    padded = torch.cat([x.detach(), 1e3 * torch.randn(2, 50, 16)], dim=1).requires_grad_()
    mask = torch.arange(80)[None] < lengths[:, None]
    y_padded = norm(padded, mask)
    assert torch.isfinite(y_padded).all()
    (y_padded[:, :30] * grad_y).sum().backward()
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(y_padded[b, :n], y[b, :n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded.grad[:, :30], x.grad, rtol=1e-4, atol=1e-5)
    assert (padded.grad[:, 30:] == 0).all()  # the extra padding influences nothing


@pytest.mark.parametrize("method", ("conv", "auto"))
def test_no_nan_at_the_extremes(method: str) -> None:
    for w1, w2 in [(0.0, -1e4), (1e4, -1e-3), (-5e3, -20.0), (50.0, 0.0), (0.0, 5.0), (-40.0, 1.0), (0.0, 0.0)]:
        norm = randomised(DynamicTokenNorm(16, 4, method=method), w1, w2)
        for length in (1, 2, 300):
            x = torch.randn(3, length, 16, requires_grad=True)
            mask = torch.zeros(3, length, dtype=torch.bool)
            mask[0] = True
            mask[1, -1] = True  # all but one padded; sequence 2 has no real token at all
            y = norm(x, mask)
            y.sum().backward()
            assert torch.isfinite(y).all() and torch.isfinite(x.grad).all(), (w1, w2, length)
            assert all(torch.isfinite(p.grad).all() for p in norm.parameters()), (w1, w2, length)


@pytest.mark.parametrize("method", ("conv", "auto"))
def test_bf16_autocast_computes_statistics_in_float32(method: str) -> None:
    norm = randomised(DynamicTokenNorm(32, 4, method=method), 0.1, -0.01)
    x = (torch.randn(2, 64, 32) * 0.5 + 20).bfloat16()  # large mean, small spread: E[x^2] - E[x]^2 cancels
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), norm(x.float()), rtol=2e-2, atol=2e-2)


def test_local_init_gives_each_head_a_gaussian_window_at_its_offset() -> None:
    assert local_offsets(4).tolist() == [-1.5, -0.5, 0.5, 1.5]
    assert local_offsets(8).tolist() == [-3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5]
    assert local_offsets(3).tolist() == [-1.0, 0.0, 1.0]
    for heads in (3, 4, 8):
        norm = DynamicTokenNorm(8 * heads, heads)
        logits = norm.kernel_logits(32).detach()
        d = torch.arange(-31, 32, dtype=torch.float64)
        for h, k in enumerate(local_offsets(heads).tolist()):
            window = torch.softmax(logits[h], 0)
            gaussian = torch.softmax(-((d - k) ** 2), 0)  # exp(-(d - k_h)^2): variance 1/2 around k_h
            torch.testing.assert_close(window, gaussian, rtol=1e-6, atol=1e-7)
            assert norm.pos_proj.weight[h, 0].item() == 2 * k and norm.pos_proj.weight[h, 1].item() == -1


def test_parameters_and_registry() -> None:
    norm = build_norm("dtn", 64, 4)
    assert isinstance(norm, (Norm, DynamicTokenNorm))
    shapes = {name: tuple(p.shape) for name, p in norm.named_parameters()}
    assert shapes == {
        "weight": (64,), "bias": (64,), "gate_mean": (4,), "gate_var": (4,),
        "pos_proj.weight": (4, 2), "pos_proj.bias": (4,),
    }
    assert isinstance(norm.pos_proj, torch.nn.Linear) and norm.pos_proj.in_features == 2
    assert (norm.gate_mean == 0).all() and (norm.gate_var == 0).all()  # sigmoid(0): half and half
    assert isinstance(build_norm("dtn_var", 64, 4), Norm)
    with pytest.raises(ValueError, match="divisible"):
        DynamicTokenNorm(30, 4)
    with pytest.raises(ValueError, match="method"):
        DynamicTokenNorm(32, 4, method="dense")


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (also used by test_dtn_grid)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("method", ("conv", "auto"))
@pytest.mark.parametrize("kernel", [None, (0.0, -1e-4)])
def test_never_materialises_a_batch_head_token_token_tensor(kernel, method: str) -> None:
    B, T, C, H = 2, 512, 16, 4
    norm = DynamicTokenNorm(C, H, method=method)
    if kernel is not None:
        randomised(norm, *kernel)
    x = torch.randn(B, T, C, requires_grad=True)
    mask = torch.arange(T)[None] < torch.tensor([[T], [300]])
    with LargestTensor() as probe:
        norm(x, mask).sum().backward()
    assert probe.largest < B * H * T * T // 8, probe.largest


def test_the_timed_layout_choice_is_cached_and_both_layouts_agree() -> None:
    """GPUs convolve in whichever layout was faster at a shape's first call (see ``_transposed_is_faster``);
    the choice must not change a single number. Checked here with CPU tensors, the same code path."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 2, 4, generator=g, dtype=torch.float64)
    planes = x.view(3, 50, 8).transpose(1, 2).unsqueeze(2)  # the channels-last planes _Conv builds
    weight = torch.randn(8, 1, 1, 7, generator=g, dtype=torch.float64)
    cpu._FASTER_TRANSPOSED.clear()
    choice = cpu._transposed_is_faster(planes, weight, 3)
    assert list(cpu._FASTER_TRANSPOSED.values()) == [choice]
    assert cpu._transposed_is_faster(planes, weight, 3) is choice and len(cpu._FASTER_TRANSPOSED) == 1
    torch.testing.assert_close(cpu._depthwise(planes.contiguous(), weight, 3), cpu._depthwise(planes, weight, 3),
                               rtol=0, atol=1e-12)
    cpu._FASTER_TRANSPOSED.clear()
