"""DTN's 2-D positional prior on an image grid (the authors' own setting) and its path: exact, sub-quadratic.

The authors' code (``wqshao126/DTN``, ``models/normkit/norms/dtn.py``) gives every pair of patches the
features ``(dx, dy, dx^2 + dy^2)`` of output minus source position (``dx`` along a row, ``dy`` down a
column) and projects them with ``pos_proj = nn.Linear(3, H)``: head ``h``'s logit is
``a_h dx + b_h dy + c_h (dx^2 + dy^2)`` (the bias cancels in the softmax over sources). The quadratic
term is a sum over the two axes, so the logit splits as ``(a dx + c dx^2) + (b dy + c dy^2)`` and the
kernel factorises exactly, ``K(dx, dy) = Kx(dx) Ky(dy)``. The three masked statistics of a token (the
sums of ``m x``, ``m x^2`` and ``m`` under its kernel, the last one the softmax normaliser) are then
two 1-D passes over the grid: along every row with ``Kx``, then along every column with ``Ky``. No
``(B, H, T, T)`` tensor exists; a pass is one batched matmul with an ``(n, n)`` Toeplitz matrix per
head and axis (``n`` = 32 for Image and Pathfinder, 128 for Path-X). Dense per-axis matrices are cheap
at these sizes (on CPU a 32-pixel pass ran 4-7 times faster as a matmul than as a depthwise convolution
over 11 taps), and they let every output row carry its own shift.

Shifts. Each output position ``(r, s)`` is shifted by ``max_i Ky(r - i) + max_i Kx(s - i)``, the best
logit of any grid position, so every weight is at most 1 and, without padding, each normaliser is at
least 1 (the best position is a real source). Padding can mask the best positions: a real token is
its own source, so its normaliser stays above :data:`EXACT_BELOW` unless the kernel puts the token
itself more than ~34 nats below the best grid position *and* the sources near that position are
masked (only sharply shifted kernels on masked images). Those rows are recomputed exactly, as a
float64 softmax over their real sources with their own maximum (:func:`exact_rows`), as the 1-D
DTN does for its far-peaked kernels.

Tokens off the grid (the CLS token that ``cls`` pooling prepends) take LayerNorm statistics alone, see
:func:`grid_dtn`; grid tokens never take them as a source.

Like the 1-D DTN, the grid's normalizer is one ``autograd.Function`` with a hand-written backward
(autograd through the same steps ran about twice as long on CPU). It keeps the pre-scaled input, the
inter-token statistics, the standardised output before the affine and the row pass's input and output
(the kernel's gradient needs both). It runs on any device (matmuls; float32, so TF32 must stay off,
PyTorch's default); host syncs: one per call (is any pixel masked?) and, on a padded grid, one more
(which outputs need the exact rows).

The fused path (:mod:`lra_dtn.dtn.fused`, 1-D prior) would take the 2-D prior with the same
factorisation: per (image, head) tile, the row pass and the column pass over the ``(2D + 1)`` packed
values with the two ``(n, n)`` Toeplitz matrices in shared memory (``2 n^2`` floats), its running
per-output maximum as the shift (which makes the exact rows unnecessary: no host sync), and its
support interval computed per axis from ``(a, c)`` and ``(b, c)``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

#: A real token whose normaliser (at most 1 from its best source, at least its own weight) is below this
#: is recomputed exactly. Above it, every weight that matters is a normal float32 (>= 1e-15 / 16384 of
#: the sum): the weights that underflow (< 1.2e-38 each, at most 16384 of them) change a statistic by
#: less than 1e-18 relative.
EXACT_BELOW = 1e-15
#: Elements of one ``(rows, grid, head_dim)`` block of the exact rows.
EXACT_CHUNK = 1 << 22


def grid_local_offsets(num_heads: int) -> Tensor:
    """``(K*K, 2)``: the ``(dx, dy)`` offset (output minus source) at which the local init centres head
    ``h``'s window, ``K = int(sqrt(H))``; heads ``K*K ... H-1`` keep their random rows.

    The authors' ``local_init`` loops ``h1, h2`` over ``range(K)`` and sets row ``h1 + K*h2`` to
    ``2 (h1 - center)`` on ``dy`` and ``2 (h2 - center)`` on ``dx``; ``center = (K - 1) / 2`` for even
    ``K``, ``K // 2`` for odd ``K``. So ``dx`` is ``h // K - center`` and ``dy`` is ``h % K - center``."""
    k = math.isqrt(num_heads)
    center = (k - 1) / 2 if k % 2 == 0 else k // 2
    h = torch.arange(k * k)
    return torch.stack([h // k, h % k], dim=1).double() - center


@torch.no_grad()
def local_init(pos_proj: nn.Linear, locality_strength: float = 1.0) -> None:
    """The authors' init of ``pos_proj`` (``weight`` ``(H, 3)`` on ``dx, dy, dx^2 + dy^2``): truncated
    normal (std 0.02; timm's default cut at +-2 is far outside), bias 0, then rows ``0 ... K*K-1`` get
    ``2 k_x, 2 k_y, -1`` -- the logit ``-((dx - k_x)^2 + (dy - k_y)^2)`` up to a constant, a Gaussian
    window of variance 1/2 per axis at offset ``(k_x, k_y)`` -- and the whole weight, random rows
    included, is multiplied by ``locality_strength``, as their ``local_init`` does."""
    nn.init.trunc_normal_(pos_proj.weight, std=0.02)
    nn.init.zeros_(pos_proj.bias)
    offsets = grid_local_offsets(pos_proj.out_features).to(pos_proj.weight)
    local = pos_proj.weight[: len(offsets)]
    local[:, :2] = 2 * offsets
    local[:, 2] = -1.0
    pos_proj.weight *= locality_strength


def axis_logits(linear: Tensor, square: Tensor, size: int) -> Tensor:
    """``(H, 2 size - 1)`` float64 logits ``linear * d + square * d^2`` of one axis' offsets
    ``d = -(size-1) ... size-1`` (column ``d + size - 1``): ``c d^2`` reaches ``1e4 c`` at 128 pixels."""
    d = torch.arange(1 - size, size, dtype=torch.float64, device=linear.device)
    return linear.double()[:, None] * d + square.double()[:, None] * d * d


def axis_weights(logits: Tensor, size: int) -> Tensor:
    """``(H, size, size)`` Toeplitz weights ``W[h, j, i] = exp(logit(j - i) - max_i logit(j - i))`` of
    output ``j`` and source ``i`` on one axis. The per-output shift is a constant of each softmax row
    (it cancels in the ratios), so it takes no gradient."""
    j = torch.arange(size, device=logits.device)
    table = logits[:, j[:, None] - j[None, :] + size - 1]
    return torch.exp(table - table.detach().amax(dim=-1, keepdim=True))


def grid_kernels(pos_weight: Tensor, pos_bias: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The per-axis float64 logit tables ``(Ly (H, 2 rows - 1), Lx (H, 2 cols - 1))`` of ``pos_proj``.

    The projection's bias cancels in the softmax; it enters with weight zero, so that its gradient is
    exactly zero (as the 1-D DTN's) rather than rounding noise or None (DDP needs every parameter)."""
    rows, cols = grid
    a, b, c = pos_weight.unbind(dim=1)  # on dx, dy, dx^2 + dy^2: the authors' feature order
    zero = 0.0 * pos_bias.double()[:, None]
    return axis_logits(b, c, rows) + zero, axis_logits(a, c, cols)


def exact_rows(ly: Tensor, lx: Tensor, xs: Tensor, mask: Tensor, where: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """``(mu, E[x^2])``, ``(n, D)``, of the outputs ``where = (b, h, row, col)`` of the planes ``xs``
    ``(B, H, rows, D, cols)``: a float64 softmax over the real sources of image ``b`` (``mask``
    ``(B, rows, cols)``) with each output's own maximum, ``O(grid)`` per output, in chunks."""
    b, h, r, s = where
    B, H, rows, D, cols = xs.shape
    sy, sx = torch.meshgrid(torch.arange(rows, device=xs.device), torch.arange(cols, device=xs.device), indexing="ij")
    out = []
    step = max(1, EXACT_CHUNK // (rows * cols * D))
    for i in range(0, len(b), step):
        bi, hi, ri, si = (t[i : i + step, None, None] for t in (b, h, r, s))
        logits = ly[hi, ri - sy + rows - 1] + lx[hi, si - sx + cols - 1]  # (n, rows, cols)
        p = torch.softmax(logits.masked_fill(~mask[bi[:, 0, 0]], -math.inf).flatten(1), dim=-1).to(xs.dtype)
        v = xs[bi[:, 0, 0], hi[:, 0, 0]].transpose(2, 3).reshape(len(p), rows * cols, D)
        out.append(torch.stack([torch.einsum("ng,ngd->nd", p, v), torch.einsum("ng,ngd->nd", p, v * v)]))
    return tuple(torch.cat(out, dim=1)) if out else (xs.new_zeros(0, D), xs.new_zeros(0, D))


def normalize(norm, x: Tensor, mask: Tensor | None) -> Tensor:
    """The path of a :class:`~lra_dtn.dtn.DynamicTokenNorm` whose prior is ``2d``: its parameters, its grid."""
    return grid_dtn(x, mask, norm.pos_proj.weight, norm.pos_proj.bias, norm.mean_gate(), norm.gate_var, norm.weight,
                    norm.bias, norm.num_heads, norm.grid, norm.eps)


def grid_dtn(x: Tensor, mask: Tensor | None, pos_weight: Tensor, pos_bias: Tensor, gate_mean: Tensor | None,
             gate_var: Tensor, weight: Tensor, bias: Tensor, num_heads: int, grid: tuple[int, int],
             eps: float) -> Tensor:
    """DTN of ``(B, T, C)`` tokens whose last ``rows * cols`` are an image grid in raster order.

    Tokens before the grid (the CLS token) are not pixels: they take LayerNorm statistics alone, i.e.
    DTN with both gates at 1 (their own intra-token mean and unbiased variance of the RMS-pre-scaled
    input, then DTN's affine). In the authors' models the CLS token never goes through a DTN layer (it
    is concatenated after them and normalised by LayerNorm), so this is what their CLS sees; a prior
    over offsets to a token without a position would be invented. Grid tokens never take them as a
    source either: a pixel's statistics are exactly the authors' module's on the grid alone."""
    rows, cols = grid
    B, T, C = x.shape
    prefix = T - rows * cols
    if prefix < 0:
        raise ValueError(f"{T} tokens cannot hold a {rows}x{cols} grid")
    if gate_mean is None:  # dtn_var: lam_m = 1, LayerNorm's mean
        gate_mean = gate_var.new_full(gate_var.shape, math.inf)
    return _GridDTNFunction.apply(x, pos_weight, pos_bias, gate_mean, gate_var, weight, bias, mask, num_heads,
                                  (rows, cols), eps)


def off_grid(x: Tensor, weight: Tensor, bias: Tensor, num_heads: int, eps: float) -> Tensor:
    """DTN with both gates at 1 for the few tokens off the grid: LayerNorm (unbiased variance) of the
    RMS-pre-scaled input, then DTN's affine; float32 statistics at least."""
    B, P, C = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        xh = x.to(dtype).view(B, P, num_heads, C // num_heads)
        xs = (xh * torch.rsqrt(xh.square().mean(dim=-1, keepdim=True) + eps)).view(B, P, C)
        y = (xs - xs.mean(dim=-1, keepdim=True)) * torch.rsqrt(xs.var(dim=-1, keepdim=True) + eps)
        return (y * weight.to(dtype) + bias.to(dtype)).to(x.dtype)


class _GridCall:
    """One call's statistics (steps 1-3) in the passes' layout, *planes* ``(B, H, rows, D, cols)``: the
    row and column passes are batched matmuls over its last and third axes. The tokens are read through
    a permuted view once on the way in (the pre-scaling writes the planes) and copied back once on the
    way out (the affine then runs on the contiguous tokens). Per-token scalars are
    ``(B, 1, rows, 1, cols)``, per-head ones ``(B, H, rows, 1, cols)``. Without padding (the usual
    image batch) no mask multiplies anything and the pre-scaled grid ``xs`` is the first ``D``
    channels of the packed values, not a copy.

    On CPU the cost of this path is memory traffic and fresh allocations (each fresh tensor's pages
    are faulted in), not arithmetic: the steps write into the buffers they keep (the passes' sums are
    normalised in place) and keep the standardised grid ``xhat`` for backward instead of recomputing it."""

    def __init__(self, x: Tensor, pos_weight: Tensor, pos_bias: Tensor, gate_mean: Tensor, gate_var: Tensor,
                 mask: Tensor | None, num_heads: int, grid: tuple[int, int], eps: float) -> None:
        B, T, C = x.shape
        H, D = num_heads, C // num_heads
        rows, cols = grid
        self.grid, self.eps, self.C, self.H, self.D = grid, eps, C, H, D
        self.prefix = P = T - rows * cols
        self.off = x[:, :P].detach().clone()  # the off-grid tokens (CLS), for their own backward
        self.dtype = dtype = torch.promote_types(x.dtype, torch.float32)  # bf16: E[x^2] - E[x]^2 < 0 (spec)
        mask = None if mask is None else mask[:, P:]
        self.mask = None if mask is None or bool(mask.all()) else mask.view(B, rows, cols)
        self.real = None if self.mask is None else self.mask.to(dtype).view(B, 1, rows, 1, cols)
        # 1. RMS pre-scaling per head; 2. LayerNorm statistics of xs = r x from per-head moments, taken
        # in the token layout (heads contiguous). The authors use torch.var's default, the *unbiased*
        # variance (divide by C - 1): kept.
        xh = x[:, P:].to(dtype).view(B, rows, cols, H, D)
        head_mean, head_sq = xh.mean(dim=-1), torch.linalg.vector_norm(xh, dim=-1).square_().div_(D)
        r = torch.rsqrt(head_sq + eps)  # (B, rows, cols, H)
        self.r = r.permute(0, 3, 1, 2).unsqueeze(3).contiguous()  # (B, H, rows, 1, cols)
        # per-head mean_d xs and mean_d xs^2, for backward's RMS step
        self.head_m = (r * head_mean).permute(0, 3, 1, 2).unsqueeze(3).contiguous()
        self.head_s = (r.square() * head_sq).permute(0, 3, 1, 2).unsqueeze(3).contiguous()
        self.mu_ln = self.head_m.mean(dim=1, keepdim=True)  # (B, 1, rows, 1, cols)
        var_ln = self.head_s.mean(dim=1, keepdim=True) - self.mu_ln.square()
        self.var_ln = var_ln.clamp_(min=0.0) * (C / (C - 1))
        values = x.new_empty((B, H, rows, self.channels(), cols), dtype=dtype)
        self.xs = values[:, :, :, :D] if self.mask is None else x.new_empty((B, H, rows, D, cols), dtype=dtype)
        torch.mul(xh.permute(0, 3, 1, 4, 2), self.r, out=self.xs)
        self.fill_values(values)
        self.lam_m, self.lam_v = torch.sigmoid(gate_mean.to(dtype)), torch.sigmoid(gate_var.to(dtype))
        # Per-head coefficients expanded over (D, cols): a broadcast (H, 1, 1) operand runs PyTorch's CPU
        # loops several times slower.
        self.keep_in = self.per_channel(self.lam_m - 1)
        self.var_in_weight = self.per_channel(1 - self.lam_v)
        # 3. the prior's per-axis weights, then the two passes over the grid
        self.pos_weight, self.pos_bias = pos_weight.detach(), pos_bias.detach()
        ly, lx = grid_kernels(self.pos_weight, self.pos_bias, grid)
        self.wy, self.wx = axis_weights(ly, rows).to(dtype), axis_weights(lx, cols).to(dtype)
        along = self.along_rows(values)
        self.kept = (values, along) if pos_weight.requires_grad else None  # for the kernel's gradient
        sums = (self.wy @ along).view(B, H, rows, self.channels(), cols)
        if self.mask is None:  # Z = (Ky 1)(Kx 1), at least 1 (each axis' best weight is 1): no exact rows
            self.axis_norms = self.wy.sum(dim=-1), self.wx.sum(dim=-1)  # (H, rows), (H, cols)
            zy, zx = self.axis_norms
            self.inv_norm = (zy[:, :, None, None] * zx[:, None, None, :]).reciprocal_()  # (H, rows, 1, cols)
            self.exact = (x.new_empty(0, dtype=torch.long),) * 4
        else:
            norm = sums[:, :, :, 2 * D :]  # (B, H, rows, 1, cols)
            served = norm >= EXACT_BELOW
            real = self.mask.view(B, 1, rows, 1, cols).expand_as(served)
            served &= real
            self.inv_norm = torch.where(served, norm, 1.0).reciprocal_().mul_(served)  # padding: zero statistics
            b, h, r, _, s = torch.nonzero(real & ~served, as_tuple=True)
            self.exact = (b, h, r, s)
        sums[:, :, :, : 2 * D].mul_(self.inv_norm)  # the sums become (mu_in, E[x^2]) in place
        self.mu_in, self.second = sums[:, :, :, :D], sums[:, :, :, D : 2 * D]
        b, h, r, s = self.exact
        if len(b):
            with torch.no_grad():
                mu, second = exact_rows(ly, lx, self.xs, self.mask, self.exact)
            self.mu_in[b, h, r, :, s], self.second[b, h, r, :, s] = mu, second
        self.mix_variance()
        self.xhat = self.centred().mul_(self.rstd)

    def channels(self) -> int:
        """Channels of the packed values: ``m xs``, ``m xs^2`` and, on a padded grid, ``m`` (``D``, ``D``,
        1). Without padding the normaliser is a product of the two axes' row sums, so the passes need not
        carry a channel of ones."""
        return 2 * self.D + (self.mask is not None)

    def fill_values(self, values: Tensor) -> None:
        """``values`` ``(B, H, rows, channels, cols)`` := ``m xs``, ``m xs^2`` and ``m`` (without padding the
        first block already is ``xs`` and there is no ``m``)."""
        D = self.D
        if self.real is None:
            first = self.xs
        else:
            first = torch.mul(self.xs, self.real, out=values[:, :, :, :D])
            values[:, :, :, 2 * D :] = self.real
        torch.mul(first, self.xs, out=values[:, :, :, D : 2 * D])  # m^2 = m

    def planes_of(self, tokens: Tensor) -> Tensor:
        """The grid of ``(B, T, C)`` tokens as ``(B, H, rows, D, cols)``: a view (a copy only for strides
        that allow none, e.g. some incoming gradients)."""
        rows, cols = self.grid
        B = tokens.shape[0]
        return tokens[:, self.prefix :].reshape(B, rows, cols, self.H, self.D).permute(0, 3, 1, 4, 2)

    def write_tokens(self, planes: Tensor, out: Tensor) -> Tensor:
        """``planes`` ``(B, H, rows, D, cols)`` written into the grid's rows of ``out`` ``(B, T, C)``."""
        self.planes_of(out).copy_(planes)
        return out

    def per_channel(self, per_head: Tensor) -> Tensor:
        """An ``(H,)`` coefficient as ``(H, 1, D, cols)``, contiguous."""
        return per_head[:, None, None, None].expand(self.H, 1, self.D, self.grid[1]).contiguous()

    def per_channel_vector(self, vector: Tensor) -> Tensor:
        """A ``(C,)`` parameter as ``(H, 1, D, cols)``, contiguous."""
        return vector.to(self.dtype).view(self.H, 1, self.D, 1).expand(self.H, 1, self.D, self.grid[1]).contiguous()

    def along_rows(self, values: Tensor) -> Tensor:
        """The row pass: ``(B, H, rows, K, cols)`` -> ``(B, H, rows, K * cols)`` for the column pass."""
        B, H, rows, K, cols = values.shape
        return (values.view(B, H, rows * K, cols) @ self.wx.transpose(1, 2)).view(B, H, rows, K * cols)

    def mix_variance(self) -> None:
        """Step 4 for the variance, kept for backward: ``var_in = max(E[x^2] - mu_in^2, 0)`` (rounding can
        push it below 0) and ``rstd = 1 / sqrt(lam_v var_ln + (1 - lam_v) var_in + eps)``."""
        self.var_in = torch.addcmul(self.second, self.mu_in, self.mu_in, value=-1.0).clamp_(min=0.0)
        var_base = self.var_ln * self.lam_v[:, None, None, None] + self.eps  # (B, H, rows, 1, cols)
        self.rstd = torch.addcmul(var_base, self.var_in, self.var_in_weight).rsqrt_()

    def centred(self) -> Tensor:
        """Step 4 for the mean: ``xs - mu``, ``mu = lam_m mu_ln + (1 - lam_m) mu_in`` (a fresh tensor)."""
        shift = self.mu_ln * -self.lam_m[:, None, None, None]  # (B, H, rows, 1, cols)
        return torch.add(self.xs, shift).addcmul_(self.mu_in, self.keep_in)

    def kernel_grad(self, g_wy: Tensor, g_wx: Tensor) -> Tensor:
        """``(H, 3)`` gradient of ``pos_proj.weight`` from those of the per-axis weights (float64).

        The logits' gradient ``G[h, j, i] = g W`` sums to zero along every output ``j`` (a constant added
        to a row's logits changes no softmax), so it is contracted with the offsets centred on the row's
        own best one, ``d - d0``, and ``d^2 - d0^2``: the same numbers exactly, but a kernel peaked far
        away no longer makes ``d`` and ``d^2`` large terms whose float32 rounding swamps their difference."""
        def logit_grad(g: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
            n = w.shape[-1]
            j = torch.arange(n, device=w.device)
            d = (j[:, None] - j[None, :]).double()  # output minus source
            d0 = (j - w.argmax(dim=-1)).double()[..., None]  # (H, n, 1): each row's best offset (weight 1)
            per_pair = (g * w).double()
            return (per_pair * (d - d0)).sum(dim=(1, 2)), (per_pair * (d - d0) * (d + d0)).sum(dim=(1, 2))

        b, cy = logit_grad(g_wy, self.wy)
        a, cx = logit_grad(g_wx, self.wx)
        return torch.stack([a, b, cx + cy], dim=1)


class _GridDTNFunction(torch.autograd.Function):
    """Keeps the pre-scaled grid, the inter-token statistics, the standardised grid and the row pass's
    input and output (for the kernel's gradient); the off-grid tokens go through :func:`off_grid` both
    ways. Backward never writes into what forward kept (``retain_graph`` / gradcheck call it again)."""

    @staticmethod
    def forward(ctx, x, pos_weight, pos_bias, gate_mean, gate_var, weight, bias, mask, num_heads, grid, eps):
        with torch.autocast(x.device.type, enabled=False):
            call = _GridCall(x, pos_weight, pos_bias, gate_mean, gate_var, mask, num_heads, grid, eps)
            y = call.write_tokens(call.xhat, x.new_empty(x.shape, dtype=call.dtype))
            grid = y[:, call.prefix :]  # 5. in the token layout, where the affine's operands are contiguous
            torch.addcmul(bias.to(y.dtype), grid, weight.to(y.dtype), out=grid)
            if call.prefix:
                y[:, : call.prefix] = off_grid(call.off, weight, bias, num_heads, eps)
            y = y.to(x.dtype)  # bf16 tokens: the affine ran in float32
        ctx.call = call
        ctx.save_for_backward(weight, bias)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        weight, bias = ctx.saved_tensors
        call = ctx.call
        with torch.autocast(grad_y.device.type, enabled=False):
            grad_x, *grads, grad_weight, grad_bias = _backward(call, grad_y, weight)
            if call.prefix:
                with torch.enable_grad():
                    leaves = [t.detach().requires_grad_() for t in (call.off, weight, bias)]
                    y = off_grid(*leaves, call.H, call.eps)
                    g_off, g_weight, g_bias = torch.autograd.grad(y, leaves, grad_y[:, : call.prefix])
                grad_x[:, : call.prefix] = g_off
                grad_weight, grad_bias = grad_weight + g_weight, grad_bias + g_bias
        return (grad_x, *grads, grad_weight, grad_bias, None, None, None, None)


def _backward(call: _GridCall, grad_y: Tensor, weight: Tensor):
    """The gradients, in as few passes and fresh full-size tensors as the algebra allows: ``t`` is one
    scratch grid reused by every product that is only summed, and ``g_sums`` receives the statistics'
    gradients where they are made."""
    H, D, C = call.H, call.D, call.C
    g = call.planes_of(grad_y).to(call.dtype, memory_format=torch.contiguous_format, copy=True)  # the grid's rows
    B, _, rows, _, cols = g.shape
    K = call.channels()
    rstd, var_in, xhat, xs = call.rstd, call.var_in, call.xhat, call.xs
    mu_in, second = call.mu_in, call.second
    t = torch.mul(g, xhat)
    grad_weight = t.sum(dim=(0, 2, 4)).reshape(C)
    grad_bias = g.sum(dim=(0, 2, 4)).reshape(C)
    g_xs = g.mul_(call.per_channel_vector(weight)).mul_(rstd)  # through xhat directly; minus this through mu
    g_var = torch.mul(xhat, g_xs, out=t).mul_(rstd)  # -1/2 of this is the gradient of var
    heads_g, heads_var = g_xs.sum(dim=3, keepdim=True), g_var.sum(dim=3, keepdim=True)  # (B, H, rows, 1, cols)
    g_sums = g_xs.new_empty(B, H, rows, K, cols)
    g_mu_in, g_var_in = g_sums[:, :, :, :D], g_sums[:, :, :, D : 2 * D]  # still scratch here
    # gates: d/d lam_m = sum g_mu (mu_ln - mu_in), d/d lam_v = sum g_var (var_ln - var_in)
    g_lam_m = (torch.mul(g_xs, mu_in, out=g_mu_in).sum(dim=(0, 2, 3, 4))
               - (heads_g * call.mu_ln).sum(dim=(0, 2, 3, 4)))
    g_lam_v = (torch.mul(g_var, var_in, out=g_var_in).sum(dim=(0, 2, 3, 4))
               - (heads_var * call.var_ln).sum(dim=(0, 2, 3, 4))) * 0.5
    lam_m, lam_v = call.lam_m[:, None, None, None], call.lam_v[:, None, None, None]
    g_mu_ln = -(heads_g * lam_m).sum(dim=1, keepdim=True)  # (B, 1, rows, 1, cols)
    g_var_ln = (heads_var * lam_v).sum(dim=1, keepdim=True) * -0.5

    # Inter-token branch: mu_in = N1 / Z, second = N2 / Z for the sums N1, N2, Z of the passes; d var_in
    # / d(second - mu_in^2) = 1 where it was not clamped at 0, i.e. sign(var_in). Exact rows: inv_norm 0.
    torch.sign(var_in, out=g_var_in).mul_(g_var).mul_(call.var_in_weight * -0.5)
    torch.mul(g_xs, call.keep_in, out=g_mu_in).addcmul_(mu_in, g_var_in, value=-2.0)
    if len(call.exact[0]):  # outputs computed exactly: their gradient through the same float64 softmax
        b, h, r, s = call.exact
        g_rows_xs, g_rows_pos = _exact_backward(call, g_mu_in[b, h, r, :, s], g_var_in[b, h, r, :, s])
    g_norm = None  # Z's gradient: needed on a padded grid, or for the kernel's gradient without padding
    if call.mask is not None or call.kept is not None:
        g_norm = torch.mul(g_mu_in, mu_in, out=t).sum(dim=3, keepdim=True)
        g_norm += torch.mul(g_var_in, second, out=t).sum(dim=3, keepdim=True)
        g_norm.mul_(call.inv_norm).neg_()  # (B, H, rows, 1, cols)
    g_sums[:, :, :, : 2 * D].mul_(call.inv_norm)
    if call.mask is not None:
        g_sums[:, :, :, 2 * D :] = g_norm
    g_planes = g_sums.view(B, H, rows, K * cols)
    g_along = call.wy.transpose(1, 2) @ g_planes  # adjoint of the column pass
    grad_pos = None
    if call.kept is not None:
        values, along = call.kept
        g_wy = (g_planes @ along.transpose(2, 3)).sum(dim=0)
        g_wx = (g_along.view(B, H, rows * K, cols).transpose(2, 3) @ values.view(B, H, rows * K, cols)).sum(dim=0)
        if call.mask is None:  # Z = zy zx with zy = Ky 1, zx = Kx 1: every weight of an output row gets its share
            zy, zx = call.axis_norms
            g_z = g_norm.squeeze(3)  # (B, H, rows, cols)
            g_wy += torch.einsum("bhrc,hc->hr", g_z, zx)[:, :, None]
            g_wx += torch.einsum("bhrc,hr->hc", g_z, zy)[:, :, None]
        grad_pos = call.kernel_grad(g_wy, g_wx)

    # ... of the row pass, into g_sums (read for the last time above): one fresh buffer fewer
    wx = call.wx.expand(B, H, cols, cols).reshape(B * H, cols, cols)
    g_values = torch.bmm(g_along.view(B * H, rows * K, cols), wx, out=g_sums.view(B * H, rows * K, cols))
    g_values = g_values.view(B, H, rows, K, cols)
    # d(m xs) = m, d(m xs^2) = 2 m xs: g_xs += m (g_1 + 2 xs g_2)
    g_first = g_values[:, :, :, :D].addcmul_(g_values[:, :, :, D : 2 * D], xs, value=2.0)
    if call.real is None:
        g_xs += g_first
    else:
        g_xs.addcmul_(g_first, call.real)
    if len(call.exact[0]):
        g_xs += g_rows_xs
        grad_pos = None if grad_pos is None else grad_pos + g_rows_pos
    # The LayerNorm statistics add alpha + beta xs per token, then the RMS pre-scaling maps g to
    # r (g - xs mean_head(g xs)); the per-head means of xs and xs^2 (kept) carry alpha's and beta's
    # share of that mean, so grad_x = r (g_xs + alpha + xs (beta - dot)).
    beta = g_var_ln * (2 / (C - 1))
    alpha = g_mu_ln / C - beta * call.mu_ln
    dot = torch.mul(g_xs, xs, out=t).mean(dim=3, keepdim=True) + alpha * call.head_m + beta * call.head_s
    g_xs.addcmul_(xs, beta - dot).add_(alpha).mul_(call.r)
    grad_x = call.write_tokens(g_xs, grad_y.new_empty(grad_y.shape))
    return (grad_x, None if grad_pos is None else grad_pos.to(call.pos_weight.dtype),
            torch.zeros_like(call.pos_bias),  # cancels in the softmax
            g_lam_m * call.lam_m * (1 - call.lam_m), g_lam_v * call.lam_v * (1 - call.lam_v), grad_weight, grad_bias)


def _exact_backward(call: _GridCall, g_mu: Tensor, g_second: Tensor) -> tuple[Tensor, Tensor]:
    """The exact outputs' share of the gradients of the planes ``xs`` and of ``pos_proj.weight``, by
    autograd through :func:`exact_rows` (rare: sharply shifted kernels on padded grids)."""
    with torch.enable_grad():
        pos_weight = call.pos_weight.double().requires_grad_()
        xs = call.xs.detach().requires_grad_()
        ly, lx = grid_kernels(pos_weight, call.pos_bias, call.grid)
        mu, second = exact_rows(ly, lx, xs, call.mask, call.exact)
        return torch.autograd.grad((mu, second), (xs, pos_weight), (g_mu, g_second))
