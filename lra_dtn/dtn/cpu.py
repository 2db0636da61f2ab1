"""DTN's eager path (CPU, and any device PyTorch runs): depthwise or FFT convolutions, one autograd Function.

On CPU, ``auto`` takes the native C kernels (:mod:`lra_dtn.dtn.native`) for every plan this path would
convolve directly; this path computes the rest (far-peaked kernels with exact rows, FFT-wide kernels,
float64 inputs) and everything where no C compiler is found, and it is what ``conv`` and ``fft`` ask for.

The kernel depends on ``d = j - i`` only, so step 3 of the spec is three convolutions with
``exp(logit - peak)`` over the kernel's effective support (:mod:`lra_dtn.dtn.kernel`): of ``mask * xs``,
of ``mask * xs^2`` and of ``mask``, the last one being each token's softmax normaliser, so padding never
enters it. No ``(B, H, T, T)`` tensor exists. The convolution runs one of two ways, picked per call:

* ``conv``: a depthwise convolution over the support (oneDNN / cuDNN). At the local init the support
  is 15 offsets;
* ``fft``: FFT convolution in float64, for kernels so wide that its ``O(T log T)`` wins.

Both agree with the dense float64 softmax to float32 precision for every real token. The numerical trap
is a kernel whose peak some token cannot reach (sharply peaked far away, or curving upward): with one
shift per head, all of that token's weights underflow. A real token is always its own source
(``d = 0``), so this cannot happen while a head's peak is within ``DYNAMIC_RANGE`` nats of its logit
at ``d = 0`` (the init, and any kernel centred near the token); otherwise the tokens concerned are found
exactly (:func:`~lra_dtn.dtn.kernel.row_max_logit`) and their rows recomputed with their own shift
(:class:`_ExactRows`).

The normalizer is one ``autograd.Function`` with a hand-written backward. Like LayerNorm it keeps only
its input and per-token scalars; backward recomputes the convolution. Both passes run over chunks of
the batch, in reused buffers: on CPU, cache misses and page faults on fresh tensors cost more than the
arithmetic (see :class:`_Workspace`). The gradient of ``pos_proj`` contracts the logits' gradient with
features centred on where the kernel collapses (:func:`~lra_dtn.dtn.kernel.centred_features`): in the
plain moment form ``(d, d^2)`` float32 rounding times ``d^2`` swamped it.

Host synchronisation: planning reads the kernel's support and its far heads back to Python (``int``,
``nonzero``, ``tolist``) once per call, and :class:`_ExactRows` lists its rows. On CPU there is no device
to wait for, so this costs only the Python work; on a GPU it is one small stall per call, which is why
``auto`` prefers the fused path there.
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lra_dtn.dtn.kernel import DYNAMIC_RANGE, Support, centred_features, kernel_logits, plan_support, row_max_logit

#: FFT rounding is relative to the largest output, and a real token's normaliser can be as small as its
#: own weight ``exp(-rel)``: float64 FFT is used only when ``rel + log(sum of weights) <= 16``.
FFT_RANGE = 16.0
#: Measured on 2 CPU cores: the float64 FFT path costs about as much as a convolution with
#: ``FFT_COST * log2(n) * n / T`` taps (``n`` the FFT length), so it pays off from ~1000 offsets.
FFT_COST = 80.0
#: oneDNN switches to a much slower depthwise kernel above about 2^23 elements; CPU calls are split by batch.
CONV_CHUNK = 1 << 22
#: On CPU both passes run over chunks of the batch of about this many tokens, so that their intermediate
#: tensors stay in cache (whole-batch passes at T = 4096 were measured 2-3 times slower on CPU). A GPU
#: takes the whole batch at once: there each chunk costs its own launches of every kernel.
CHUNK_TOKENS = 8192
#: Normalisers below this belong to padded tokens no real token reaches (underflow or rounding noise).
TINY = 1e-30
#: What ``method`` may ask of this path: ``auto`` chooses per call between the two engines.
METHODS = ("auto", "conv", "fft")


# --------------------------------------------------------------------------------------------------
# The plan: the kernel's support (lra_dtn.dtn.kernel) and the engine that convolves with it.


@dataclass
class Plan(Support):
    method: str  # "conv" | "fft"
    dtype: torch.dtype  # of the convolutions (the statistics' dtype)


def _fast_fft_length(n: int) -> int:
    """Smallest 5-smooth integer >= n (pocketfft and cuFFT are fastest on those)."""
    best, p5 = 1 << max(n - 1, 0).bit_length(), 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p = p35
            while p < n:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


def make_plan(pos_weight: Tensor, length: int, method: str, dtype: torch.dtype) -> Plan:
    """The support of this call's kernel, its weights in ``dtype``, and the engine ``method`` asks for
    (``auto``: FFT where it is cheaper; FFT only where its rounding cannot swamp a token's weights)."""
    support = plan_support(kernel_logits(pos_weight.detach(), length))
    kernel, dmin, dmax = support.kernel, support.dmin, support.dmax
    chosen = "conv"
    taps = 2 * max(dmax, -dmin) + 1
    # (n >= length: FFT cannot be cheaper below FFT_COST * log2(length) taps, so n is not always needed)
    if method == "fft" or (method == "auto" and taps > FFT_COST * math.log2(max(length, 2))):
        n = _fast_fft_length(length + max(dmax, -dmin))
        cheaper = method == "fft" or FFT_COST * math.log2(n) * n / length < taps
        if cheaper and not support.far and float((support.rel + kernel.sum(dim=1).log()).max()) <= FFT_RANGE:
            chosen = "fft"
    return Plan(**vars(support), method=chosen, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Workspace. On CPU a freshly allocated (B, T, C) tensor costs more in page faults than the arithmetic
# done on it (glibc hands large blocks back to the OS on free), so every transient buffer of both passes
# lives here, reused from call to call; only the output and the input gradient are fresh tensors, as in
# LayerNorm. Nothing here is saved for backward or returned. Per thread, so concurrent calls are safe.


class _Workspace(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[tuple, Tensor] = {}
        # The views handed out, per (name, dtype, device, shape): a short call spends more on dispatching
        # two view ops per buffer than on some of the arithmetic (~580 ops a call at T = 101, C = 64).
        self.views: dict[tuple, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """A tensor of ``shape`` on ``like``'s device, of ``like``'s dtype unless ``dtype`` is given;
        its content is whatever the last user left."""
        dtype = like.dtype if dtype is None else dtype
        key = (name, dtype, like.device)
        view = self.views.get((*key, shape))
        if view is not None:
            return view
        numel = math.prod(shape)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[key] = torch.empty(numel, dtype=dtype, device=like.device)
            self.views = {k: v for k, v in self.views.items() if k[:3] != key}  # views of the old buffer
        if len(self.views) >= 4096:  # one per (buffer, shape): lengths vary from batch to batch
            self.views.clear()
        view = self.views[(*key, shape)] = buffer[:numel].view(shape)
        return view


_WORKSPACE = _Workspace()


# --------------------------------------------------------------------------------------------------
# Convolution engines. The values of one chunk are three tensors: m*xs and m*xs^2, (b, T, H, D), and the
# mask per head, (b, T, H); their convolutions give the two numerators and the softmax normaliser. Kept
# apart (not packed into one tensor) so that every elementwise pass runs on contiguous memory.


class _Conv:
    """Depthwise convolution (cross-correlation) over the support, on channels-last views of the
    ``(b, T, channels)`` tensors, so no transpose is ever copied; the per-channel weights are built once."""

    def __init__(self, plan: Plan, head_dim: int) -> None:
        self.radius = R = max(plan.dmax, -plan.dmin)  # symmetric padding: conv2d pads both sides alike
        kernel = plan.kernel.new_zeros(plan.kernel.shape[0], 2 * R + 1)  # offsets -R ... R, float64
        kernel[:, plan.dmin + R : plan.dmax + R + 1] = plan.kernel
        features = centred_features(torch.arange(-R, R + 1, device=kernel.device), plan.centre)  # (H, 2R + 1, 2)
        # conv2d correlates: the forward convolution takes the kernel reversed, its adjoint as it is
        taps = {"forward": kernel.flip(-1), "transpose": kernel}
        taps.update({f: (kernel * features[..., f]).flip(-1) for f in (0, 1)})  # towards d/dw1, d/dw2
        # (H, 2R + 1) -> (H * channels, 1, 1, 2R + 1), for tensors with head_dim and with 1 channel per head
        self.weights = {
            (name, per_head): t.to(plan.dtype).repeat_interleave(per_head, dim=0)[:, None, None, :].contiguous()
            for name, t in taps.items()
            for per_head in {head_dim, 1}
        }

    def _correlate(self, x: Tensor, name, out: Tensor) -> Tensor:
        """``out[t] = sum_w taps[w] * x[t + w - R]`` per channel, for ``x`` ``(b, T, H[, D])``."""
        B, T = x.shape[:2]
        channels = math.prod(x.shape[2:])
        weight = self.weights[(name, channels // x.shape[2])]
        planes = x.view(B, T, channels).transpose(1, 2).unsqueeze(2)  # (B, channels, 1, T) channels-last
        result = out.view(B, T, channels).transpose(1, 2).unsqueeze(2)
        cpu = x.device.type == "cpu"
        step = max(1, CONV_CHUNK // (T * channels)) if cpu else B
        with _exact_convolutions(x.device):
            if not cpu and _transposed_is_faster(planes, weight, self.radius):
                planes = planes.contiguous()  # NCHW: PyTorch's own depthwise kernel instead of cuDNN's NHWC one
            for i in range(0, B, step):
                rows = slice(i, i + step)
                # (a whole batch in one step is sliced by no op: short calls pay per dispatched op)
                target, source = (result, planes) if step >= B else (result[rows], planes[rows])
                if _ONEDNN_ACCUMULATE and cpu and x.dtype == torch.float32:
                    # oneDNN adds the convolution into the (zeroed) workspace: no fresh output to fault in
                    _depthwise_add_into(target.zero_(), source, weight, self.radius)
                else:
                    target.copy_(_depthwise(source, weight, self.radius))
        return out

    def conv(self, x: Tensor, out: Tensor) -> Tensor:
        """``out[j] = sum_d k(d) * x[j - d]``."""
        return self._correlate(x, "forward", out)

    def conv_transpose(self, g: Tensor, out: Tensor) -> Tensor:
        """``out[i] = sum_d k(d) * g[i + d]``, the adjoint of :meth:`conv`."""
        return self._correlate(g, "transpose", out)

    def moments(self, grads: list[Tensor], values: list[Tensor]) -> Tensor:
        """``(H, 2)``: ``sum_d k(d) f(d) * sum_j <grads[j], values[j - d]>`` for the centred features
        ``f`` of ``d`` and ``d^2`` (:func:`~lra_dtn.dtn.kernel.centred_features`), summed over the
        ``(b, T, H, D)`` pairs given -- their share of the gradients of ``w1`` and ``w2``."""
        moments = []
        for feature in (0, 1):
            total = 0
            for g, v in zip(grads, values):
                shifted = self._correlate(v, feature, _WORKSPACE.get("moment", v.shape, v))
                total = total + shifted.mul_(g).sum(dim=(0, 1))  # the leading dims first: a fast reduction
            moments.append(total.sum(dim=-1))
        return torch.stack(moments, dim=-1)

    def moment_convs(self, x: Tensor) -> list[Tensor]:
        """The convolutions of ``x`` with ``k(d) f(d)`` for both centred features (fresh tensors)."""
        return [self._correlate(x, feature, torch.empty_like(x)) for feature in (0, 1)]


#: oneDNN's fused "convolution + add into a given tensor" (the op inductor uses), when this build has it.
_ONEDNN_ACCUMULATE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise_")


def _depthwise_add_into(out: Tensor, planes: Tensor, weight: Tensor, radius: int) -> Tensor:
    """``out += _depthwise(planes, weight, radius)`` in one oneDNN call. The op is private (inductor's
    fused conv + add); its arguments are named after its schema so that a change there fails loudly here."""
    return torch.ops.mkldnn._convolution_pointwise_.binary(
        other=out, X=planes, W=weight, B=None, padding=[0, radius], stride=[1, 1], dilation=[1, 1],
        groups=planes.shape[1], binary_attr="add", alpha=None, unary_attr=None, unary_scalars=[],
        unary_algorithm=None)


def _depthwise(planes: Tensor, weight: Tensor, radius: int) -> Tensor:
    return F.conv2d(planes, weight, padding=(0, radius), groups=planes.shape[1])


#: Per (shape, dtype, device, taps): whether the depthwise convolution ran faster after copying the
#: channels-last planes to NCHW. On GPUs the channels-last call goes to cuDNN's grouped kernels, which are
#: very slow for some shapes (pytorch/pytorch#34977); NCHW goes to PyTorch's own depthwise kernel, at the
#: cost of a transposing copy. Which wins depends on the GPU and library versions, so it is timed once.
_FASTER_TRANSPOSED: dict[tuple, bool] = {}


def _transposed_is_faster(planes: Tensor, weight: Tensor, radius: int, repeats: int = 3) -> bool:
    """Time both layouts once per key (a few calls each, after a warm-up), remember the winner."""
    key = (tuple(planes.shape), planes.dtype, planes.device, tuple(weight.shape))
    if key not in _FASTER_TRANSPOSED:
        sync = torch.cuda.synchronize if planes.device.type == "cuda" else (lambda: None)

        def seconds(prepare) -> float:
            _depthwise(prepare(planes), weight, radius)
            sync()
            start = time.perf_counter()
            for _ in range(repeats):
                _depthwise(prepare(planes), weight, radius)
            sync()
            return time.perf_counter() - start

        _FASTER_TRANSPOSED[key] = seconds(Tensor.contiguous) < seconds(lambda t: t)
    return _FASTER_TRANSPOSED[key]


@contextlib.contextmanager
def _exact_convolutions(device: torch.device):
    """cuDNN would use TF32 (10-bit mantissa) for float32 convolutions by default."""
    if device.type != "cuda":
        yield
        return
    with torch.backends.cudnn.flags(
        enabled=torch.backends.cudnn.enabled,
        benchmark=torch.backends.cudnn.benchmark,
        deterministic=torch.backends.cudnn.deterministic,
        allow_tf32=False,
    ):
        yield


class _FFT:
    """FFT convolution in float64 along the tokens, zero-padded so no offset aliases; same interface
    as :class:`_Conv` (the per-head spectrum broadcasts over a head's channels)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        device = plan.kernel.device
        self.n = _fast_fft_length(plan.table.shape[1] // 2 + 1 + max(plan.dmax, -plan.dmin))
        self.positions = torch.arange(plan.dmin, plan.dmax + 1, device=device) % self.n
        circular = torch.zeros(plan.kernel.shape[0], self.n, dtype=torch.float64, device=device)
        circular[:, self.positions] = plan.kernel
        self.spectrum = torch.fft.rfft(circular, dim=-1).T  # (F, H)
        self.features = centred_features(torch.arange(plan.dmin, plan.dmax + 1, device=device), plan.centre)
        self.moment_spectra = []
        for feature in (0, 1):
            circular[:, self.positions] = plan.kernel * self.features[..., feature]
            self.moment_spectra.append(torch.fft.rfft(circular, dim=-1).T)

    def _spectrum(self, x: Tensor) -> Tensor:
        return torch.fft.rfft(x.double(), n=self.n, dim=1)

    def _apply(self, x: Tensor, spectrum: Tensor, out: Tensor) -> Tensor:
        spectrum = spectrum if x.dim() == 3 else spectrum[..., None]
        return out.copy_(torch.fft.irfft(self._spectrum(x) * spectrum, n=self.n, dim=1)[:, : x.shape[1]])

    def conv(self, x: Tensor, out: Tensor) -> Tensor:
        return self._apply(x, self.spectrum, out)

    def conv_transpose(self, g: Tensor, out: Tensor) -> Tensor:
        return self._apply(g, self.spectrum.conj(), out)

    def moments(self, grads: list[Tensor], values: list[Tensor]) -> Tensor:
        cross = 0
        for g, v in zip(grads, values):
            cross = cross + (self._spectrum(g) * self._spectrum(v).conj()).sum(dim=(0, 3))
        lags = torch.fft.irfft(cross, n=self.n, dim=0)[self.positions].T  # (H, W): sum <g[j], v[j - d]>
        grad_logits = lags * self.plan.kernel
        return torch.einsum("hw,hwf->hf", grad_logits, self.features).to(values[0].dtype)

    def moment_convs(self, x: Tensor) -> list[Tensor]:
        return [self._apply(x, spectrum, torch.empty_like(x)) for spectrum in self.moment_spectra]


# --------------------------------------------------------------------------------------------------
# Tokens the per-head shift cannot serve: exact softmax rows, shifted by each row's own best logit.

class _ExactRows:
    """Softmax rows computed directly (``O(T)`` each) for the real tokens of far heads (peaked far from
    ``d = 0``) whose best source is more than :data:`DYNAMIC_RANGE` below the head's peak, or at another
    offset than the head's peak: the convolution's kernel gradient is centred on the head's peak offset
    (:func:`~lra_dtn.dtn.kernel.centred_features`), these rows' on their own best offset."""

    CHUNK = 1 << 22  # elements of one (rows, T) weight block

    def __init__(self, plan: Plan, mask: Tensor | None, batch: int, length: int) -> None:
        self.table, self.mask, self.length = plan.table, mask, length
        best, best_offset = (t.expand(batch, length, -1) for t in row_max_logit(plan.table, mask, length))
        real = torch.ones(batch, length, dtype=torch.bool, device=best.device) if mask is None else mask
        self.needy = torch.zeros(batch, length, plan.table.shape[0], dtype=torch.bool, device=best.device)
        self.groups: list[tuple[int, int, Tensor, Tensor, Tensor]] = []
        for h in plan.far:
            unreached = (best[..., h] < plan.peak[h] - DYNAMIC_RANGE) | (best_offset[..., h] != plan.centre[h])
            self.needy[..., h] = real & unreached
            for b in torch.nonzero(self.needy[..., h].any(dim=1)).flatten().tolist():
                for rows in torch.nonzero(self.needy[b, :, h]).flatten().split(max(1, self.CHUNK // length)):
                    self.groups.append((b, h, rows, best[b, rows, h], best_offset[b, rows, h]))

    def __bool__(self) -> bool:
        return bool(self.groups)

    def _weights(self, b: int, h: int, rows: Tensor, best: Tensor, dtype) -> tuple[Tensor, Tensor]:
        offsets = rows[:, None] - torch.arange(self.length, device=rows.device)[None, :]
        logits = self.table[h, offsets + (self.length - 1)] - best[:, None]
        if self.mask is not None:
            logits = logits.masked_fill(~self.mask[b][None, :], -math.inf)
        return logits.exp().to(dtype), offsets

    def forward(self, values: list[Tensor], sums: list[Tensor]) -> None:
        """Overwrite these rows of ``sums`` with their exact sums (scaled per row: only ratios matter)."""
        for b, h, rows, best, _ in self.groups:
            weights = self._weights(b, h, rows, best, values[0].dtype)[0]
            for v, s in zip(values, sums):
                s[b, rows, h] = weights @ v[b, :, h]

    def backward(self, grads: list[Tensor], values: list[Tensor], grad_values: list[Tensor], moments: Tensor) -> None:
        """Add these rows' share of the value gradients and of the ``w1, w2`` gradients (in place)."""
        for b, h, rows, best, best_offset in self.groups:
            weights, offsets = self._weights(b, h, rows, best, values[0].dtype)
            g_weights = 0
            for g, v in zip(grads, values):  # (rows, T) gradient of the weights
                g_rows, v_bh = g[b, rows, h], v[b, :, h]
                g_weights = g_weights + (g_rows @ v_bh.T if v_bh.dim() == 2 else g_rows[:, None] * v_bh[None, :])
            for g, gv in zip(grads, grad_values):  # the mask has no gradient
                gv[b, :, h] += weights.T @ g[b, rows, h]
            g_logits = (g_weights * weights).double()  # (rows, T), each row centred on its own best offset
            features = centred_features(offsets, best_offset)  # (rows, T, 2)
            moments[h] += torch.einsum("rt,rtf->f", g_logits, features).to(moments.dtype)


# --------------------------------------------------------------------------------------------------
# The normalizer as one autograd function. The elementwise work is written for PyTorch's fast CPU loops:
# contiguous operands, per-head coefficients expanded to (H, D) (an (H, 1) operand, or a broadcast first
# operand, runs a loop several times slower), in-place ops into workspace buffers, and the indicator of
# the variance clamp as sign(var_in) (masked_fill with a boolean mask is ~30 times slower).


class _Call:
    """Everything a call needs besides its chunk of tokens, computed once for the whole batch:
    steps 1-2 (per-token scalars), the kernel plan and engine, and broadcast-ready coefficients."""

    def __init__(self, x, pos_weight, gate_mean, gate_var, weight, bias, mask, num_heads, eps, method) -> None:
        B, T, C = x.shape
        H, D = num_heads, C // num_heads
        self.C, self.D, self.eps, self.mask = C, D, eps, mask
        # Statistics in float32 at least: in bf16, E[x^2] - E[x]^2 goes negative (spec: "Precision").
        self.dtype = dtype = torch.promote_types(x.dtype, torch.float32)
        xh = x.to(dtype).reshape(B, T, H, D)

        # 1. RMS pre-scaling per head; 2. LayerNorm statistics of xs = r * x over all C channels, from
        # per-head moments (one pass; only a token nearly constant across its channels loses precision).
        self.head_mean = xh.mean(dim=-1)
        head_sq = torch.linalg.vector_norm(xh, dim=-1).square_().div_(D)
        self.scale = torch.rsqrt(head_sq + eps)  # r, (B, T, H)
        self.mu_ln = (self.scale * self.head_mean).mean(dim=-1)
        # The authors use torch.var's default, the *unbiased* variance (divide by C - 1): kept.
        var_ln = (self.scale.square() * head_sq).mean(dim=-1) - self.mu_ln.square()
        self.var_ln = var_ln.clamp_(min=0.0) * (C / (C - 1))

        self.plan = make_plan(pos_weight, T, method, dtype)
        self.engine = _FFT(self.plan) if self.plan.method == "fft" else _Conv(self.plan, D)
        self.lam_m, self.lam_v = torch.sigmoid(gate_mean.to(dtype)), torch.sigmoid(gate_var.to(dtype))

        def per_channel(per_head: Tensor) -> Tensor:
            return per_head[:, None].expand(H, D).contiguous()

        self.w, self.b = weight.to(dtype).view(H, D), bias.to(dtype).view(H, D)
        self.keep_in = per_channel(self.lam_m - 1)  # mu = xs - (xs - lam_m mu_ln) ... see centred()
        self.var_in_weight = per_channel(1 - self.lam_v)
        self.var_in_grad = per_channel((self.lam_v - 1) * 0.5)
        self.shift = (-self.lam_m * self.mu_ln[..., None])[..., None]  # (B, T, H, 1)
        self.var_base = (self.lam_v * self.var_ln[..., None]).add_(eps)[..., None]
        self.scale4 = self.scale[..., None]
        self.mask_f = None if mask is None else mask.to(dtype)[..., None]  # (B, T, 1)
        self.masked_scale4 = self.scale4 if mask is None else self.scale4 * self.mask_f[..., None]
        step = max(1, (CHUNK_TOKENS + T // 2) // T) if x.device.type == "cpu" else B
        self.chunks = [slice(i, min(i + step, B)) for i in range(0, B, step)]
        self.exact = [
            _ExactRows(self.plan, None if mask is None else mask[c], c.stop - c.start, T) if self.plan.far else None
            for c in self.chunks
        ]
        # The softmax normaliser of every token: the convolution of the mask, for the whole batch at once.
        # Padded tokens take zero inter-token statistics: the spec asks only that their outputs be finite,
        # and far from every real token their normaliser is rounding noise or underflow.
        self.real = xh.new_ones(B, T, H) if mask is None else mask.to(dtype)[..., None].expand(B, T, H).contiguous()
        norm = self.engine.conv(self.real, torch.empty_like(self.real))
        for c, exact in zip(self.chunks, self.exact):
            if exact:
                exact.forward([self.real[c]], [norm[c]])
        self.inv_norm = norm.clamp(min=TINY).reciprocal_().mul_(norm > TINY).mul_(self.real)[..., None]
        self.real_moments: list[Tensor] | None = None  # backward's convolutions of the mask with k d, k d^2

    def values(self, i: int, xh: Tensor) -> list[Tensor]:
        """Chunk ``i``'s values (workspace): ``m*xs`` and ``m*xs^2``, ``(b, T, H, D)``."""
        first = torch.mul(xh, self.masked_scale4[self.chunks[i]], out=_WORKSPACE.get("first", xh.shape, xh))
        return [first, torch.mul(first, first, out=_WORKSPACE.get("second", xh.shape, xh))]  # m^2 = m

    def inter_token(self, i: int, values: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Step 3 for chunk ``i``: ``mu_in`` and ``E_P[xs^2]``, ``(b, T, H, D)`` workspace."""
        sums = [self.engine.conv(v, _WORKSPACE.get(name, v.shape, v)) for v, name in zip(values, ("mu_in", "mean_sq"))]
        if self.exact[i]:
            self.exact[i].forward(values, sums)
        inv_norm = self.inv_norm[self.chunks[i]]
        return sums[0].mul_(inv_norm), sums[1].mul_(inv_norm)

    def rstd(self, c: slice, mu_in: Tensor, second: Tensor, var_out: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
        """``var_in = max(E_P[x^2] - mu_in^2, 0)`` (rounding can push it below zero) and, step 4,
        ``1 / sqrt(lam_v var_ln + (1 - lam_v) var_in + eps)``, into the given buffers."""
        var_in = torch.addcmul(second, mu_in, mu_in, value=-1.0, out=var_out).clamp_(min=0.0)
        return var_in, torch.mul(var_in, self.var_in_weight, out=out).add_(self.var_base[c]).rsqrt_()

    def centred(self, c: slice, xh: Tensor, mu_in: Tensor, out: Tensor) -> Tensor:
        """``xs - mu`` with ``xs = r x`` and the gated mean ``mu = lam_m mu_ln + (1 - lam_m) mu_in``."""
        return torch.mul(xh, self.scale4[c], out=out).add_(self.shift[c]).addcmul_(mu_in, self.keep_in)


class _DTNFunction(torch.autograd.Function):
    """Keeps the input and per-token scalars, like LayerNorm; backward recomputes the inter-token
    statistics (two convolutions per chunk: on CPU cheaper than keeping them in fresh memory)."""

    @staticmethod
    def forward(ctx, x, pos_weight, pos_bias, gate_mean, gate_var, weight, bias, mask, num_heads, eps, method):
        with torch.autocast(x.device.type, enabled=False):
            call = _Call(x, pos_weight, gate_mean, gate_var, weight, bias, mask, num_heads, eps, method)
            xh = x.to(call.dtype).reshape(*call.scale.shape, call.D)
            y = torch.empty_like(xh)
            for i, c in enumerate(call.chunks):  # 3. inter-token statistics; 4. mixing; 5. standardise
                values = call.values(i, xh[c])
                mu_in, second = call.inter_token(i, values)
                _, rstd = call.rstd(c, mu_in, second, var_out=values[0], out=values[1])
                call.centred(c, xh[c], mu_in, out=y[c]).mul_(rstd.mul_(call.w)).add_(call.b)
        ctx.save_for_backward(x, pos_bias, gate_mean, gate_var, weight, bias)
        ctx.call = call
        return y.view(x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, pos_bias, gate_mean, gate_var, weight, bias = ctx.saved_tensors
        call = ctx.call
        with torch.autocast(grad_y.device.type, enabled=False):
            xh = x.to(call.dtype).reshape(*call.scale.shape, call.D)
            gy = grad_y.to(call.dtype).reshape(xh.shape)
            grad_x = torch.empty_like(xh)
            totals = torch.zeros(6, *call.w.shape, dtype=call.dtype, device=x.device)  # w, b, 2 gates, w1, w2
            for i in range(len(call.chunks)):
                _backward_chunk(call, i, xh, gy, grad_x, totals, kernel_grad=ctx.needs_input_grad[1])
        lam_m, lam_v = call.lam_m, call.lam_v
        grad_gate_mean = None
        if ctx.needs_input_grad[3]:
            grad_gate_mean = (totals[2, :, 0] * lam_m * (1 - lam_m)).to(gate_mean.dtype)
        grad_gate_var = (totals[3, :, 0] * lam_v * (1 - lam_v)).to(gate_var.dtype)
        grad_pos_weight = totals[4:6, :, 0].T.contiguous().to(pos_bias.dtype) if ctx.needs_input_grad[1] else None
        return (
            grad_x.view(x.shape).to(x.dtype), grad_pos_weight, torch.zeros_like(pos_bias), grad_gate_mean,
            grad_gate_var, totals[0].reshape(-1).to(weight.dtype), totals[1].reshape(-1).to(bias.dtype),
            None, None, None, None,
        )


def _backward_chunk(call: _Call, i: int, xh: Tensor, gy: Tensor, grad_x: Tensor, totals: Tensor, kernel_grad: bool):
    """Backward of chunk ``i``: writes its rows of ``grad_x``, adds the parameter gradients to ``totals``."""
    c, C, eps = call.chunks[i], call.C, call.eps
    xh, gy, g_x, scale = xh[c], gy[c], grad_x[c], call.scale[c]
    work = lambda name: _WORKSPACE.get(name, xh.shape, xh)  # noqa: E731
    scratch = work("scratch")

    values = call.values(i, xh)
    mu_in, second = call.inter_token(i, values)
    inv_norm = call.inv_norm[c]
    var_in, rstd = call.rstd(c, mu_in, second, var_out=work("var_in"), out=work("rstd"))
    xhat = call.centred(c, xh, mu_in, out=work("xhat")).mul_(rstd)
    totals[0] += torch.mul(gy, xhat, out=scratch).sum(dim=(0, 1))
    totals[1] += gy.sum(dim=(0, 1))
    g_xs = torch.mul(gy, call.w, out=g_x).mul_(rstd)  # through xhat directly; minus this through mu
    g_var = xhat.mul_(g_xs).mul_(rstd)  # -1/2 of this is the gradient of var
    g_xs_heads, g_var_heads = g_xs.sum(dim=-1), g_var.sum(dim=-1)
    # gates: d/d lam_m = sum g_mu (mu_ln - mu_in), d/d lam_v = sum g_var (var_ln - var_in)
    mu_ln, var_ln = call.mu_ln[c, :, None], call.var_ln[c, :, None]
    # (reduced over the leading dims first: a reduction over the last, short one is several times slower)
    g_lam_m = torch.mul(g_xs, mu_in, out=scratch).sum(dim=(0, 1)).sum(dim=-1) - (g_xs_heads * mu_ln).sum(dim=(0, 1))
    totals[2] += g_lam_m[:, None]
    g_lam_v = torch.mul(g_var, var_in, out=scratch).sum(dim=(0, 1)).sum(dim=-1) - (g_var_heads * var_ln).sum(dim=(0, 1))
    totals[3] += g_lam_v[:, None] * 0.5

    # Inter-token branch: mu_in = N1/Z and second = N2/Z for the sums N1, N2, Z of the convolution;
    # d var_in / d(second - mu_in^2) = 1 where it was not clamped at 0, i.e. sign(var_in).
    g_var_in = g_var.mul_(call.var_in_grad).mul_(torch.sign(var_in, out=var_in))
    g_sum1 = torch.mul(g_xs, call.keep_in, out=work("g_sum1")).addcmul_(mu_in, g_var_in, value=-2.0).mul_(inv_norm)
    g_sum2 = g_var_in.mul_(inv_norm)
    g_norm = torch.mul(g_sum1, mu_in, out=scratch).addcmul_(g_sum2, second).sum(dim=-1).neg_()
    exact, row_grads = call.exact[i], None
    if exact:  # the exact rows take their gradients from row_grads; the convolutions must not
        row_grads = [g.clone() for g in (g_sum1, g_sum2, g_norm)]  # rare: only far-peaked kernels
        for g in (g_sum1, g_sum2, g_norm):
            g.masked_fill_(exact.needy if g.dim() == 3 else exact.needy[..., None], 0.0)
    g_first = call.engine.conv_transpose(g_sum1, work("g_first"))
    g_second = call.engine.conv_transpose(g_sum2, work("g_second"))
    if kernel_grad:
        if call.real_moments is None:  # the mask's share needs its convolutions with k d, k d^2: once a call
            call.real_moments = call.engine.moment_convs(call.real)
        moments = call.engine.moments([g_sum1, g_sum2], values)
        moments += torch.stack([(g_norm * conv[c]).sum(dim=(0, 1)) for conv in call.real_moments], dim=-1)
        if exact:
            exact.backward(row_grads, [*values, call.real[c]], [g_first, g_second], moments)
        totals[4:6] += moments.T[..., None]
    elif exact:
        exact.backward(row_grads, [*values, call.real[c]], [g_first, g_second], xh.new_zeros(xh.shape[2], 2))

    # d(m*xs) = m, d(m*xs^2) = 2*m*xs, with xs = r x.
    if call.mask is not None:
        g_first.mul_(call.mask_f[c, ..., None])
    g_first.addcmul_(g_second.mul_(2 * call.masked_scale4[c]), xh)
    g_head = g_xs.add_(g_first)
    # The LayerNorm statistics add alpha + beta * xs per token; the RMS pre-scaling then maps g to
    # r (g - xs mean_head(g xs)), where mean_head(xs) and mean_head(xs^2) = 1 - eps r^2 are known.
    beta = (g_var_heads * call.lam_v).sum(dim=-1, keepdim=True) * (-1.0 / (C - 1))
    alpha = (g_xs_heads * call.lam_m).sum(dim=-1, keepdim=True) * (-1.0 / C) - beta * mu_ln
    dot = torch.mul(g_head, xh, out=scratch).mean(dim=-1).mul_(scale)
    dot += alpha * call.head_mean[c] * scale + beta * (1 - eps * scale.square())
    g_head.mul_(call.scale4[c]).add_((scale * alpha)[..., None])
    g_head.addcmul_(xh, (scale.square() * (beta - dot))[..., None])


def normalize(norm, x: Tensor, mask: Tensor | None, method: str = "auto") -> Tensor:
    """DTN of ``x`` with the parameters of ``norm`` (a :class:`~lra_dtn.dtn.DynamicTokenNorm`);
    ``method`` is one of :data:`METHODS`."""
    return _DTNFunction.apply(
        x, norm.pos_proj.weight, norm.pos_proj.bias, norm.mean_gate(), norm.gate_var, norm.weight, norm.bias,
        mask, norm.num_heads, norm.eps, method,
    )
