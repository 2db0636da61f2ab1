"""DTN's positional prior: the logits of the kernel over token offsets, and where that kernel matters.

Every path (CPU convolution, FFT, fused) sees the prior only through this boundary:

* :func:`kernel_logits` turns the parameters into a ``(H, 2T - 1)`` float64 table of logits over the
  offsets ``d = j - i = -(T-1) ... T-1`` (the 1-D prior of the spec: ``w1 d + w2 d^2``; a 2-D prior
  only has to produce its own table);
* :func:`plan_support` decides, from that table alone, which offsets carry weight (the effective
  support, see :data:`TRUNCATION`), the per-head shift that keeps ``exp`` in range, and which heads
  peak so far from ``d = 0`` that some tokens need their own shift (see :data:`DYNAMIC_RANGE`);
* :func:`row_max_logit` finds those tokens' own best logit exactly.

The local init's offsets (:func:`local_offsets`) live here too: they are the prior's starting point.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

#: Dropped kernel mass, relative to the smallest softmax normaliser of any token the fast path serves.
TRUNCATION = 1e-9
#: Tokens whose own best logit is more than this below their head's peak are recomputed row by row:
#: ``exp(-DYNAMIC_RANGE)`` times the truncation margin must stay a normal float32.
DYNAMIC_RANGE = 50.0


def local_offsets(num_heads: int) -> Tensor:
    """The integer-spaced offsets ``k_h`` of the local init, centred on zero.

    The authors' ``center = (K - 1) / 2`` for even ``K`` and ``K // 2`` for odd ``K``; in 1-D ``K = H``,
    so ``H = 4`` gives ``-1.5, -0.5, 0.5, 1.5`` and ``H = 3`` gives ``-1, 0, 1``."""
    center = (num_heads - 1) / 2 if num_heads % 2 == 0 else num_heads // 2
    return torch.arange(num_heads, dtype=torch.float64) - center


def kernel_logits(pos_weight: Tensor, length: int, pos_bias: Tensor | None = None) -> Tensor:
    """``(H, 2T - 1)`` logits of the offsets ``d = -(T-1) ... T-1`` (column ``d + T - 1``), in float64:
    ``w2 * d^2`` reaches ``1e7`` at LRA lengths, where float32 rounding would move a weight by ``e``."""
    d = torch.arange(1 - length, length, device=pos_weight.device, dtype=torch.float64)
    bias = None if pos_bias is None else pos_bias.double()
    return F.linear(offset_features(d), pos_weight.double(), bias).T


def offset_features(d: Tensor) -> Tensor:
    """``(..., 2)``: the features ``(d, d^2)`` of the offsets ``d`` (float64), whose weighted sum by a
    row of ``pos_proj.weight`` is that head's logit."""
    d = d.double()
    return torch.stack([d, d * d], dim=-1)


def centred_features(d: Tensor, centre: Tensor) -> Tensor:
    """``offset_features(d) - offset_features(centre)`` per centre: ``(*centre.shape, W, 2)`` for offsets ``d``
    of shape ``(W,)`` or ``(*centre.shape, W)``.

    Why the gradients of ``pos_proj.weight`` take these instead of ``(d, d^2)``: a head's softmax does not
    change when all its logits move together, so per token the gradient of the logits sums to zero, and
    ``sum_d g(d) f(d) = sum_d g(d) (f(d) - f(c))`` for any constant ``c``. When a kernel collapses onto one
    offset ``d0`` far from zero (sharp, far-shifted or upward-curving), ``g(d0)`` is the difference of
    two nearly equal float32 products and carries their rounding, about ``1e-7`` of each, while the
    true gradient there is ``exp(-(gap to the next offset))``-small; multiplied by ``d0^2 ~ 4e6`` that
    rounding became the whole gradient (T = 2048, ``w2 = 0.038``: -0.54 for a true 1e-27). Centred at
    ``c = d0`` the rounding is multiplied by exactly zero, and every other offset's ``g(d)`` is an
    accurate product of its own small weight. Feature differences are exact in float64. The eager path
    centres each head on :attr:`Support.centre` and each exactly computed row on its own best offset."""
    return offset_features(d) - offset_features(centre)[..., None, :]


@dataclass
class Support:
    """Where a kernel matters, decided once per call from its logit table (no batch involved)."""

    table: Tensor  # (H, 2T - 1) float64 logits, no bias
    kernel: Tensor  # (H, W) float64 weights exp(logit - peak) of the offsets dmin ... dmax
    dmin: int
    dmax: int
    peak: Tensor  # (H,) float64, the per-head shift
    centre: Tensor  # (H,) float64: a far head's peak offset (the first, where several tie), else 0
    rel: Tensor  # (H,) float64 >= 0: how far below its peak a head puts the token itself (d = 0)
    far: list[int]  # heads whose peak is more than DYNAMIC_RANGE above their logit at d = 0

    @property
    def width(self) -> int:
        return self.dmax - self.dmin + 1


def plan_support(table: Tensor) -> Support:
    """The effective support of the kernel whose ``(H, 2T - 1)`` logits are ``table``."""
    length = (table.shape[1] + 1) // 2
    peak, column = table.max(dim=1)
    rel = peak - table[:, length - 1]
    reach = rel.clamp(max=DYNAMIC_RANGE)
    # Keep every offset within reach + log(2T / TRUNCATION) nats of the peak: the dropped mass is at most
    # TRUNCATION * exp(-reach), and every token the fast path serves has a normaliser >= exp(-reach).
    keep = table >= (peak - reach - math.log(2 * length / TRUNCATION))[:, None]
    keep[:, length - 1] = True
    first, last = torch.nonzero(keep.any(dim=0)).flatten()[[0, -1]].tolist()
    dmin, dmax = first - (length - 1), last - (length - 1)
    kernel = torch.exp(table[:, dmin + length - 1 : dmax + length] - peak[:, None])
    far = torch.nonzero(rel > DYNAMIC_RANGE).flatten().tolist()
    # The centre of the kernel gradient's features (see centred_features): where tokens collapse. In a
    # head within DYNAMIC_RANGE of d = 0 a collapse can only happen within a few offsets of d = 0 (each
    # token reaches d = 0, and a collapse needs its neighbours many nats lower), e.g. a token whose only
    # real source is itself; in a far head, at its peak (other tokens get their own rows).
    centre = torch.where(rel > DYNAMIC_RANGE, column - (length - 1), 0).double()
    return Support(table, kernel, dmin, dmax, peak, centre, rel, far)


def row_max_logit(table: Tensor, mask: Tensor | None, length: int) -> tuple[Tensor, Tensor]:
    """``(B or 1, T, H)`` twice: the largest logit over each token's *real* sources, exactly, and the
    offset ``j - i`` of that source (float64; the smallest offset where two tie, as :func:`plan_support`).

    A quadratic in ``d`` peaks (concave) at the source nearest to its vertex or (linear, convex) at one
    of the two extreme sources, so four candidates per token suffice: the first and last real token and
    the real tokens just before and after ``j - vertex``."""
    device, heads = table.device, table.shape[0]
    idx = torch.arange(length, device=device)
    real = torch.ones(1, length, dtype=torch.bool, device=device) if mask is None else mask
    before = torch.where(real, idx, -1).cummax(dim=1).values  # last real index <= t, or -1
    after = torch.where(real, idx, length).flip(1).cummin(dim=1).values.flip(1)  # first real >= t, or T
    centre = length - 1  # far heads need T >= 2, so d = -1, 0, 1 are in the table
    w1 = (table[:, centre + 1] - table[:, centre - 1]) / 2
    w2 = (table[:, centre + 1] + table[:, centre - 1]) / 2 - table[:, centre]
    vertex = torch.where(w2 < 0, -w1 / (2 * w2).clamp(max=-1e-300), torch.zeros_like(w1))
    target = (idx[:, None] - vertex[None, :]).clamp(0, length - 1)  # (T, H)
    batch = real.shape[0]
    candidates = [
        before[:, target.floor().long().flatten()].view(batch, length, heads),
        after[:, target.ceil().long().flatten()].view(batch, length, heads),
        after[:, :1, None].expand(batch, length, heads),
        before[:, -1:, None].expand(batch, length, heads),
    ]
    best = torch.full((batch, length, heads), -math.inf, dtype=torch.float64, device=device)
    best_offset = torch.zeros(batch, length, heads, dtype=torch.float64, device=device)
    head = torch.arange(heads, device=device)
    for source in candidates:
        offset = idx[None, :, None] - source.clamp(0, length - 1)
        logit = torch.where((source >= 0) & (source < length), table[head, offset + centre], -math.inf)
        better = (logit > best) | ((logit == best) & (offset < best_offset))
        best, best_offset = torch.where(better, logit, best), torch.where(better, offset.double(), best_offset)
    return best, best_offset
