"""DTN's 2-D positional prior on an image grid: the authors' own setting, exact and sub-quadratic.

The authors' code (``wqshao126/DTN``, ``models/normkit/norms/dtn.py``) gives every pair of patches the
features ``(dx, dy, dx^2 + dy^2)`` of output minus source position (``dx`` along a row, ``dy`` down a
column) and projects them with ``pos_proj = nn.Linear(3, H)``: head ``h``'s logit is
``a_h dx + b_h dy + c_h (dx^2 + dy^2)`` (the bias cancels in the softmax over sources). The quadratic
term is a sum over the two axes, so the logit splits as ``(a dx + c dx^2) + (b dy + c dy^2)`` and the
kernel factorises exactly, ``K(dx, dy) = Kx(dx) Ky(dy)``. The three masked statistics of a token (the
sums of ``m x``, ``m x^2`` and ``m`` under its kernel, the last one the softmax normaliser) are then
two 1-D passes over the grid: along every row with ``Kx``, then along every column with ``Ky``. No
``(B, H, T, T)`` tensor exists; a pass is one batched matmul with an ``(n, n)`` Toeplitz matrix per
head and axis (``n`` = 32 for Image and Pathfinder, 128 for Path-X: small enough that the dense
per-axis matrix beats any truncation, and it lets every output row carry its own shift).

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
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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
def local_init_2d(pos_proj: nn.Linear, locality_strength: float = 1.0) -> None:
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


def separable_sums(values: Tensor, along_columns: Tensor, along_rows: Tensor) -> Tensor:
    """``values`` ``(B, H, rows, K, cols)`` -> ``sum_{r', s'} Wy[h, r, r'] Wx[h, s, s'] values[b, h, r', k, s']``.

    The layout keeps both passes free of transposes: the row pass contracts the last axis, the column
    pass the third (one batched matmul each, per batch element and head)."""
    B, H, rows, K, cols = values.shape
    along = values.reshape(B, H, rows * K, cols) @ along_rows.transpose(1, 2)
    return (along_columns @ along.view(B, H, rows, K * cols)).view(B, H, rows, K, cols)


def grid_kernels(pos_weight: Tensor, pos_bias: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The per-axis float64 logit tables ``(Ly (H, 2 rows - 1), Lx (H, 2 cols - 1))`` of ``pos_proj``.

    The projection's bias cancels in the softmax; it enters with weight zero, so that its gradient is
    exactly zero (as the 1-D DTN's) rather than rounding noise or None (DDP needs every parameter)."""
    rows, cols = grid
    a, b, c = pos_weight.unbind(dim=1)  # on dx, dy, dx^2 + dy^2: the authors' feature order
    zero = 0.0 * pos_bias.double()[:, None]
    return axis_logits(b, c, rows) + zero, axis_logits(a, c, cols)


def exact_rows(ly: Tensor, lx: Tensor, xs: Tensor, mask: Tensor, rows: tuple[Tensor, Tensor, Tensor],
               cols: int) -> tuple[Tensor, Tensor]:
    """``(mu, E[x^2])``, ``(n, D)``, of the rows ``(b, token, head)``: a float64 softmax over the real
    grid sources of sequence ``b`` with each row's own maximum, ``O(grid)`` per row, in chunks."""
    b, t, h = rows
    B, G, H, D = xs.shape
    height = ly.shape[1] // 2 + 1
    source = torch.arange(G, device=xs.device)
    sy, sx = source // cols, source % cols
    out = []
    step = max(1, EXACT_CHUNK // (G * D))
    for i in range(0, len(b), step):
        bi, ti, hi = b[i : i + step, None], t[i : i + step, None], h[i : i + step, None]
        logits = ly[hi, ti // cols - sy + height - 1] + lx[hi, ti % cols - sx + cols - 1]  # (n, G)
        p = torch.softmax(logits.masked_fill(~mask[bi[:, 0]], -math.inf), dim=-1).to(xs.dtype)
        v = xs[bi[:, 0], :, hi[:, 0]]  # (n, G, D)
        out.append(torch.stack([torch.einsum("ng,ngd->nd", p, v), torch.einsum("ng,ngd->nd", p, v * v)]))
    return tuple(torch.cat(out, dim=1)) if out else (xs.new_zeros(0, D), xs.new_zeros(0, D))


def grid_statistics(xs: Tensor, mask: Tensor | None, pos_weight: Tensor, pos_bias: Tensor,
                    grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """DTN's inter-token statistics ``(mu_in, var_in)`` of grid tokens ``xs`` ``(B, G, H, D)``, raster
    order, with the 2-D prior; ``mask`` ``(B, G)`` true for real pixels. Padded pixels are never
    sources, and take zero statistics themselves (their outputs only need to be finite)."""
    B, G, H, D = xs.shape
    rows, cols = grid
    ly, lx = grid_kernels(pos_weight, pos_bias, grid)
    wy, wx = axis_weights(ly, rows).to(xs.dtype), axis_weights(lx, cols).to(xs.dtype)
    real = xs.new_ones(B, G) if mask is None else mask.to(xs.dtype)
    first = xs * real[..., None, None]
    values = torch.cat([first, first * xs, real[..., None, None].expand(B, G, H, 1)], dim=-1)
    values = values.view(B, rows, cols, H, 2 * D + 1).permute(0, 3, 1, 4, 2)  # (B, H, rows, K, cols)
    sums = separable_sums(values, wy, wx).permute(0, 2, 4, 1, 3).reshape(B, G, H, 2 * D + 1)
    norm = sums[..., -1]
    needy = (norm.detach() < EXACT_BELOW) & (real[..., None] > 0)
    served = (real[..., None] > 0) & ~needy
    inv_norm = torch.where(served, norm, 1.0).reciprocal() * served
    mu_in, second = sums[..., :D] * inv_norm[..., None], sums[..., D : 2 * D] * inv_norm[..., None]
    if needy.any():
        where = torch.nonzero(needy, as_tuple=True)
        real_mask = torch.ones(B, G, dtype=torch.bool, device=xs.device) if mask is None else mask
        exact_mu, exact_second = exact_rows(ly, lx, xs, real_mask, where, cols)
        mu_in, second = mu_in.index_put(where, exact_mu), second.index_put(where, exact_second)
    return mu_in, (second - mu_in.square()).clamp(min=0.0)


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
    B, T, C = x.shape
    rows, cols = grid
    prefix = T - rows * cols
    if prefix < 0:
        raise ValueError(f"{T} tokens cannot hold a {rows}x{cols} grid")
    H, D = num_heads, C // num_heads
    dtype = torch.promote_types(x.dtype, torch.float32)  # bf16 makes E[x^2] - E[x]^2 negative (spec)
    with torch.autocast(x.device.type, enabled=False):
        xh = x.to(dtype).view(B, T, H, D)
        xs = xh * torch.rsqrt(xh.square().mean(dim=-1, keepdim=True) + eps)  # 1. RMS pre-scaling per head
        mu_ln, var_ln = xs.view(B, T, C).mean(dim=-1), xs.view(B, T, C).var(dim=-1)  # 2. unbiased (authors)
        grid_mask = None if mask is None else mask[:, prefix:]
        mu_in, var_in = grid_statistics(xs[:, prefix:], grid_mask, pos_weight, pos_bias, grid)  # 3.
        lam_m = torch.ones_like(gate_var) if gate_mean is None else torch.sigmoid(gate_mean)
        lam_m, lam_v = lam_m.to(dtype)[:, None], torch.sigmoid(gate_var).to(dtype)[:, None]
        mu_ln, var_ln = mu_ln[..., None, None], var_ln[..., None, None]
        mu = torch.cat([mu_ln[:, :prefix].expand(B, prefix, H, D),  # 4. off-grid tokens: LayerNorm's
                        lam_m * mu_ln[:, prefix:] + (1 - lam_m) * mu_in], dim=1)
        var = torch.cat([var_ln[:, :prefix].expand(B, prefix, H, D),
                         lam_v * var_ln[:, prefix:] + (1 - lam_v) * var_in], dim=1)
        y = ((xs - mu) * torch.rsqrt(var + eps)).view(B, T, C) * weight.to(dtype) + bias.to(dtype)  # 5.
    return y.to(x.dtype)
