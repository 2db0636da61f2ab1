"""DTN's fused path (``method="fused"``): Triton kernels that read each activation a few times, not ~100.

What the kernels compute, per head ``h`` and token ``j`` (specs/dtn.md): the RMS-pre-scaled values
``xs = r x``, the softmax ``P[j, i]`` over real sources ``i`` of ``w1 d + w2 d^2`` (``d = j - i``), the
inter-token moments ``mu_in = P xs`` and ``E2 = P xs^2``, the gate mix with LayerNorm's statistics, and
the affine. The positional kernel is never tabulated: every program computes its logits in float64 from
``w1, w2`` (at ``d ~ 4000`` float32 logits would be off by whole nats).

Four kernels (LayerNorm has two), then a few small torch sums of per-program partial results:

* ``_ln_stats``: per token, LayerNorm's mean and (unbiased) variance of ``xs`` over all ``C`` channels,
  from per-head moments. 1 read of ``x``.
* ``_forward``: per (batch, head, tile of ``BLOCK`` tokens): the tile's sources ``x[i]`` for
  ``j - i`` in the support, blocks of ``BLOCK`` at a time (``tl.dot``), an online softmax (a running
  per-token maximum, as flash attention): exact for every shift, however far the kernel's peak lies
  from a token or how steeply it curves up. Writes ``y``. 1 read (+ halo) and 1 write.
* ``_backward_rows``: recomputes the same sums for each output token ``j`` and writes per-token scalars
  only: each head's share of the LayerNorm-statistic gradients (a token's every head needs their sum over
  the heads before its input gradient can be formed, hence a kernel of its own) and gate partial sums.
* ``_backward_sources``: per source tile, recomputes every output token that sees the tile (the tile
  itself and, a tile-aligned block at a time, the support's reach on either side) and what it sends back,
  ``a = dL/dmu_in / Z`` and ``b = dL/dE2 / Z`` per channel; then the transposed banded sums
  ``sum_j P[j, i] (a_j, b_j)``, the logit gradient ``P[j, i] (s[j, i] - sbar_j)``, and the whole input
  gradient (direct path, LayerNorm statistics, RMS pre-scaling). Parameter gradients leave as
  per-program partial sums.

Why recompute ``a, b`` rather than store them: two float32 tensors of the activations' size, written
by one kernel and read back with a halo by the next, were a third of the path's bytes (2.7x LayerNorm's
per token at the official ListOps shape, 2.0x without them; ``traffic_bytes``). Recomputing them re-reads
``x`` and ``grad_y`` of the tile's halo instead, at 1.6x the backward's matrix products (``tl.dot`` calls
per program at that shape): the right trade on GPUs whose tensor cores do tens of (three-pass TF32)
FLOPs per byte of memory, for the local-init kernel of a few offsets. A kernel much wider than ``BLOCK``
pays for it: each recomputed block re-reads its own halo (a 255-offset kernel moves 8.5x LayerNorm's
bytes, against 6.3x with stored coefficients, and its backward does twice the matrix products).

Support, without a host sync: a real token is its own source, and ``logit(0) = 0``, so every real
token's row maximum is ``>= 0``; offsets whose logit is below ``-SUPPORT_NATS`` carry less than
``2T exp(-SUPPORT_NATS)`` of any real token's mass and are dropped. Each program computes that interval
from ``w1, w2`` (roots of a quadratic) and loops over just those sources: no ``.item()``, no re-planning,
and the set of pairs is the same in every pass, so the gradients are those of exactly the function the
forward computed. An upward-curving kernel (``w2 > 0``) has no bounded support and costs ``O(T^2)``.

The ``pos_proj`` gradient is accumulated per pair as ``P (s - sbar) (d - d0)`` and
``P (s - sbar) (d - d0) (d + d0)`` with ``d0`` the offset of the token's row maximum. Both equal the
plain moments (``sum_i P (s - sbar) = 0``), but a kernel collapsed onto one far offset now contributes
``~0`` instead of the difference of two terms of size ``d0^2`` (the float32 defect of issue 11).
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from lra_dtn.dtn.module import DEVICE_PATHS, PATHS

try:
    import triton
    import triton.language as tl
except ImportError:  # the optional extra .[gpu]; CUDA builds of torch ship it
    triton = None

#: Offsets whose logit is this far below ``logit(0) = 0`` are dropped: at most ``2T exp(-40)``
#: (``< 1e-13`` at T = 4096) of a real token's softmax mass.
SUPPORT_NATS = 40.0
#: Tokens per tile, for output rows and source blocks alike (``tl.dot`` needs at least 16).
BLOCK = 64
#: float32 products on tensor cores in three TF32 passes: float32 accuracy (plain TF32 is not).
DOT_PRECISION = "tf32x3"
#: Warps per program and software-pipelining depth of the banded kernels. Chosen without a GPU from
#: ptxas's report for sm_90 (``BLOCK`` 64, head_dim 64): 8 warps and 2 stages spill least (~1 KB per
#: thread in the forward); to be tuned by timing on the GPU.
NUM_WARPS = 8
NUM_STAGES = 2
#: Triton compiles an integer argument equal to 1 as a constant; the length must stay a run-time value
#: (the support's arithmetic converts it to float64), and one compiled kernel serves every length.
NOT_SPECIALIZED = ["T"]


def check_device(x: Tensor) -> None:
    """Refuse, with the reason, inputs the kernels cannot run on."""
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"DTN method 'fused' runs on CUDA tensors, or on CPU under TRITON_INTERPRET=1 (set before "
                           f"triton is imported); got a {x.device.type} tensor")


if triton is not None:

    @triton.jit
    def _support(w1, w2, T, NATS: tl.constexpr):
        """``[lo, hi]``: offsets with ``w1 d + w2 d^2 >= -NATS`` (hull), within ``|d| < T``; always holds 0."""
        far = (T - 1).to(tl.float64)
        concave = w2 < 0
        w2_safe = tl.where(concave, w2, -1.0)
        root = tl.sqrt(tl.maximum(w1 * w1 - 4.0 * w2_safe * NATS, 0.0))
        lo_root = (root - w1) / (2.0 * w2_safe)
        hi_root = (-root - w1) / (2.0 * w2_safe)
        rising = (w2 == 0) & (w1 > 0)  # linear: only one side is cut
        falling = (w2 == 0) & (w1 < 0)
        w1_pos = tl.where(rising, w1, 1.0)
        w1_neg = tl.where(falling, -w1, 1.0)
        lo = tl.where(concave, lo_root, tl.where(rising, -NATS / w1_pos, -far))
        hi = tl.where(concave, hi_root, tl.where(falling, NATS / w1_neg, far))
        lo = tl.minimum(tl.maximum(tl.floor(lo) - 1.0, -far), 0.0)
        hi = tl.maximum(tl.minimum(tl.ceil(hi) + 1.0, far), 0.0)
        return lo.to(tl.int32), hi.to(tl.int32)

    @triton.jit
    def _head(pos_weight, gate_mean, gate_var, T, NATS: tl.constexpr):
        """The head ``h`` (grid axis 1) and sequence ``b`` (axis 2) of this program, the head's kernel
        coefficients (float64), gates (after the sigmoid) and support ``[lo, hi]``; axis 0 is the tile."""
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        w1 = tl.load(pos_weight + 2 * h).to(tl.float64)
        w2 = tl.load(pos_weight + 2 * h + 1).to(tl.float64)
        lam_m = 1.0 / (1.0 + tl.exp(-tl.load(gate_mean + h).to(tl.float32)))
        lam_v = 1.0 / (1.0 + tl.exp(-tl.load(gate_var + h).to(tl.float32)))
        lo, hi = _support(w1, w2, T, NATS)
        return h, b, w1, w2, lam_m, lam_v, lo, hi

    @triton.jit
    def _load_tokens(x, mask, b, h, rows, inside, T, C, D, eps, HAS_MASK: tl.constexpr, BLOCK_D: tl.constexpr):
        """``xs = r x`` of head ``h`` for ``rows`` (zero where not ``inside``), ``r``, and the mask as 0/1."""
        cols = tl.arange(0, BLOCK_D)
        offsets = (b * T + rows.to(tl.int64))[:, None] * C + h * D + cols[None, :]
        values = tl.load(x + offsets, mask=inside[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(values * values, axis=1) / D + eps)
        if HAS_MASK:
            real = tl.load(mask + b * T + rows, mask=inside, other=0).to(tl.float32)
        else:
            real = inside.to(tl.float32)
        return values * r[:, None], r, real

    @triton.jit
    def _logits(rows, sources, w1, w2, lo, hi, valid):
        """float64 logits of the pairs ``(rows, sources)``, ``-inf`` outside the support or where
        ``valid`` (per source) is false."""
        d = rows[:, None] - sources[None, :]
        dd = d.to(tl.float64)
        logit = w1 * dd + w2 * dd * dd
        keep = (d >= lo) & (d <= hi) & valid[None, :]
        return tl.where(keep, logit, float("-inf")), d

    @triton.jit
    def _inter_token(x, mask, b, h, j0, rows_first, rows_last, T, C, D, w1, w2, lo, hi, eps,
                     HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr):
        """For output tokens ``j0 ... j0 + BLOCK - 1``: ``sum_i e[j, i] m_i xs_i``, ``sum_i e m xs^2``,
        ``Z = sum_i e m`` with ``e = exp(logit - M_j)``, the offset ``d0`` of the row maximum ``M_j``,
        and the tile's own ``xs``, ``r`` and mask. Online softmax over the source blocks: exact whatever
        the kernel's shift. The blocks are aligned to the tiles, so the tile's own rows are one of them
        (kept, not loaded again); only the sources of the rows ``rows_first ... rows_last - 1`` (a part of
        the tile, which holds ``j0``) are loaded, and only those rows' results are complete."""
        rows = j0 + tl.arange(0, BLOCK)
        first = tl.maximum(rows_first - hi, 0)
        last = tl.minimum(rows_last - lo, T)  # exclusive
        best = tl.full([BLOCK], float("-inf"), tl.float64)
        anchor = tl.zeros([BLOCK], tl.int32)
        z = tl.zeros([BLOCK], tl.float32)
        sum1 = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        sum2 = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        own_xs = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        own_r = tl.zeros([BLOCK], tl.float32)
        own_real = tl.zeros([BLOCK], tl.float32)
        for i0 in range(first // BLOCK * BLOCK, last, BLOCK):
            sources = i0 + tl.arange(0, BLOCK)
            wanted = (sources >= first) & (sources < last)
            xs, r, real = _load_tokens(x, mask, b, h, sources, wanted, T, C, D, eps, HAS_MASK, BLOCK_D)
            if i0 == j0:
                own_xs, own_r, own_real = xs, r, real
            logit, _ = _logits(rows, sources, w1, w2, lo, hi, real > 0)
            block_best = tl.max(logit, axis=1)
            new_best = tl.maximum(best, block_best)
            shift = tl.where(new_best == float("-inf"), 0.0, new_best)
            rescale = tl.exp((best - shift).to(tl.float32))
            e = tl.exp((logit - shift[:, None]).to(tl.float32))
            anchor = tl.where(block_best > best, rows - (i0 + tl.argmax(logit, axis=1)), anchor)
            z = z * rescale + tl.sum(e, axis=1)
            v1 = xs * real[:, None]
            sum1 = sum1 * rescale[:, None] + tl.dot(e, v1, input_precision=DOT)
            sum2 = sum2 * rescale[:, None] + tl.dot(e, v1 * xs, input_precision=DOT)
            best = new_best
        return sum1, sum2, z, anchor, own_xs, own_r, own_real

    @triton.jit
    def _standardise(xs, real, sum1, sum2, z, mu_ln, var_ln, lam_m, lam_v, eps):
        """Steps 3-5 up to the affine: ``mu_in``, ``E2``, clamped ``var_in``, ``rstd`` and ``xhat``.
        Padded tokens take zero inter-token statistics (their outputs need only be finite)."""
        inv_z = tl.where(real > 0, 1.0 / tl.maximum(z, 1e-30), 0.0)
        mu_in = sum1 * inv_z[:, None]
        second = sum2 * inv_z[:, None]
        var_in = tl.maximum(second - mu_in * mu_in, 0.0)
        mu = lam_m * mu_ln[:, None] + (1.0 - lam_m) * mu_in
        var = lam_v * var_ln[:, None] + (1.0 - lam_v) * var_in
        rstd = 1.0 / tl.sqrt(var + eps)
        return mu_in, second, var_in, rstd, (xs - mu) * rstd

    @triton.jit
    def _ln_stats(x, mu_ln, var_ln, rows_total, C, D, H, eps, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
        """LayerNorm's statistics of ``xs`` over all ``C`` channels, from per-head moments; the
        variance is the unbiased one (the authors' ``torch.var``)."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, BLOCK_D)
        inside = rows < rows_total
        total = tl.zeros([BLOCK], tl.float32)
        total_sq = tl.zeros([BLOCK], tl.float32)
        for h in range(0, H):
            offsets = rows.to(tl.int64)[:, None] * C + h * D + cols[None, :]
            v = tl.load(x + offsets, mask=inside[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
            sq = tl.sum(v * v, axis=1)
            r = 1.0 / tl.sqrt(sq / D + eps)
            total += r * tl.sum(v, axis=1)
            total_sq += r * r * sq
        mean = total / C
        var = tl.maximum(total_sq / C - mean * mean, 0.0) * (C / (C - 1.0))
        tl.store(mu_ln + rows, mean, mask=inside)
        tl.store(var_ln + rows, var, mask=inside)

    @triton.jit(do_not_specialize=NOT_SPECIALIZED)
    def _forward(x, mask, pos_weight, gate_mean, gate_var, weight, bias, mu_ln, var_ln, y, T, C, D, eps,
                 HAS_MASK: tl.constexpr, NATS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT: tl.constexpr):
        """``y`` of one tile of tokens of one head of one sequence."""
        j0 = tl.program_id(0) * BLOCK
        h, b, w1, w2, lam_m, lam_v, lo, hi = _head(pos_weight, gate_mean, gate_var, T, NATS)
        sum1, sum2, z, _, xs, _, real = _inter_token(x, mask, b, h, j0, j0, j0 + BLOCK, T, C, D, w1, w2, lo, hi,
                                                     eps, HAS_MASK, BLOCK, BLOCK_D, DOT)
        rows = j0 + tl.arange(0, BLOCK)
        inside = rows < T
        mu = tl.load(mu_ln + b * T + rows, mask=inside, other=0.0)
        var = tl.load(var_ln + b * T + rows, mask=inside, other=0.0)
        _, _, _, _, xhat = _standardise(xs, real, sum1, sum2, z, mu, var, lam_m, lam_v, eps)
        cols = tl.arange(0, BLOCK_D)
        w = tl.load(weight + h * D + cols, mask=cols < D, other=0.0).to(tl.float32)
        bb = tl.load(bias + h * D + cols, mask=cols < D, other=0.0).to(tl.float32)
        offsets = (b * T + rows.to(tl.int64))[:, None] * C + h * D + cols[None, :]
        tl.store(y + offsets, xhat * w[None, :] + bb[None, :], mask=inside[:, None] & (cols < D)[None, :])

    @triton.jit
    def _output_gradients(x, mask, grad_y, weight, mu_ln, var_ln, b, h, j0, rows_first, rows_last, T, C, D,
                          w1, w2, lo, hi, lam_m, lam_v, eps, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
                          BLOCK_D: tl.constexpr, DOT: tl.constexpr):
        """Recomputes the output tokens ``rows_first ... rows_last - 1`` of the tile at ``j0`` (the tile's
        other rows come out zero) and what their gradient sends back, in this order:

        * for their sources: ``a = dL/dmu_in / Z`` and ``b = dL/dE2 / Z`` per channel, ``sbar / Z`` and the
          offset ``d0`` of the row maximum;
        * for themselves: ``g_mu = dL/dmu`` and ``g_var = dL/dvar`` per channel, ``mu_in``, ``var_in``;
        * the rows' ``xs``, ``r``, mask (0 outside the range), ``grad_y``, ``xhat`` and LayerNorm statistics."""
        sum1, sum2, z, anchor, xs, r, real = _inter_token(x, mask, b, h, j0, rows_first, rows_last, T, C, D, w1, w2,
                                                          lo, hi, eps, HAS_MASK, BLOCK, BLOCK_D, DOT)
        rows = j0 + tl.arange(0, BLOCK)
        cols = tl.arange(0, BLOCK_D)
        needed = (rows >= rows_first) & (rows < rows_last) & (rows < T)
        m_ln = tl.load(mu_ln + b * T + rows, mask=needed, other=0.0)
        v_ln = tl.load(var_ln + b * T + rows, mask=needed, other=0.0)
        real = tl.where(needed, real, 0.0)
        mu_in, second, var_in, rstd, xhat = _standardise(xs, real, sum1, sum2, z, m_ln, v_ln, lam_m, lam_v, eps)
        offsets = (b * T + rows.to(tl.int64))[:, None] * C + h * D + cols[None, :]
        w = tl.load(weight + h * D + cols, mask=cols < D, other=0.0).to(tl.float32)
        gy = tl.load(grad_y + offsets, mask=needed[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
        g_xhat = gy * w[None, :]
        g_mu = -g_xhat * rstd  # dL/dmu, per channel
        g_var = -0.5 * g_xhat * xhat * rstd * rstd  # dL/dvar
        g_var_in = tl.where(var_in > 0, (1.0 - lam_v) * g_var, 0.0)
        inv_z = tl.where(real > 0, 1.0 / tl.maximum(z, 1e-30), 0.0)
        coef1 = (1.0 - lam_m) * g_mu - 2.0 * mu_in * g_var_in  # dL/dmu_in through mu and var_in
        sbar = tl.sum(coef1 * mu_in + g_var_in * second, axis=1)
        return (coef1 * inv_z[:, None], g_var_in * inv_z[:, None], sbar * inv_z, anchor,
                g_mu, g_var, mu_in, var_in,
                xs, r, real, gy, xhat, m_ln, v_ln)

    @triton.jit
    def _transposed_sums(g1, g2, g_w1, g_w2, a, bq, sbar, d0, row_real, rows, sources, xs, real, w1, w2, lo, hi,
                         DOT: tl.constexpr):
        """Adds one block of output tokens ``rows`` (coefficients from :func:`_output_gradients`) to the
        source tile's transposed banded sums ``sum_j P[j, i] (a_j, b_j)`` and to its ``w1, w2`` gradients,
        the logit gradient ``P[j, i] (s[j, i] - sbar_j)`` times ``d - d0`` and ``(d - d0)(d + d0)``."""
        d0f = d0.to(tl.float64)
        best = tl.where(row_real, w1 * d0f + w2 * d0f * d0f, float("inf"))  # padded rows: e = 0
        logit, d = _logits(rows, sources, w1, w2, lo, hi, real > 0)
        e = tl.exp((logit - best[:, None]).to(tl.float32))
        g1 = g1 + tl.dot(tl.trans(e), a, input_precision=DOT)
        g2 = g2 + tl.dot(tl.trans(e), bq, input_precision=DOT)
        v1 = xs * real[:, None]
        s = tl.dot(a, tl.trans(v1), input_precision=DOT) + tl.dot(bq, tl.trans(v1 * xs), input_precision=DOT)
        g_logit = e * (s - sbar[:, None])
        centred = (d - d0[:, None]).to(tl.float32)
        g_w1 = g_w1 + tl.sum(g_logit * centred, axis=0)
        g_w2 = g_w2 + tl.sum(g_logit * centred * (d + d0[:, None]).to(tl.float32), axis=0)
        return g1, g2, g_w1, g_w2

    @triton.jit(do_not_specialize=NOT_SPECIALIZED)
    def _backward_rows(x, mask, grad_y, pos_weight, gate_mean, gate_var, weight, mu_ln, var_ln, ln_grads, gate_parts,
                       T, C, D, H, eps, HAS_MASK: tl.constexpr, NATS: tl.constexpr, BLOCK: tl.constexpr,
                       BLOCK_D: tl.constexpr, DOT: tl.constexpr):
        """Per output token, the per-head shares of the LayerNorm-statistic gradients ``sum_c lam_m g_mu``
        and ``sum_c lam_v g_var`` (a token's every head needs their sum over the heads, hence a kernel of
        its own); the gate gradients per program."""
        tile = tl.program_id(0)
        j0 = tile * BLOCK
        h, b, w1, w2, lam_m, lam_v, lo, hi = _head(pos_weight, gate_mean, gate_var, T, NATS)
        _, _, _, _, g_mu, g_var, mu_in, var_in, _, _, _, _, _, m_ln, v_ln = _output_gradients(
            x, mask, grad_y, weight, mu_ln, var_ln, b, h, j0, j0, j0 + BLOCK, T, C, D, w1, w2, lo, hi, lam_m, lam_v,
            eps, HAS_MASK, BLOCK, BLOCK_D, DOT)
        rows = j0 + tl.arange(0, BLOCK)
        inside = rows < T
        token = (b * T + rows) * H + h
        tl.store(ln_grads + 2 * token, lam_m * tl.sum(g_mu, axis=1), mask=inside)
        tl.store(ln_grads + 2 * token + 1, lam_v * tl.sum(g_var, axis=1), mask=inside)
        part = ((b * H + h) * tl.num_programs(0) + tile) * 2
        tl.store(gate_parts + part, tl.sum(tl.sum(g_mu * (m_ln[:, None] - mu_in), axis=1), axis=0))
        tl.store(gate_parts + part + 1, tl.sum(tl.sum(g_var * (v_ln[:, None] - var_in), axis=1), axis=0))

    @triton.jit(do_not_specialize=NOT_SPECIALIZED)
    def _backward_sources(x, mask, grad_y, pos_weight, gate_mean, gate_var, weight, mu_ln, var_ln, ln_grads, grad_x,
                          affine_parts, kernel_parts, T, C, D, H, eps, HAS_MASK: tl.constexpr, NATS: tl.constexpr,
                          BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr):
        """Per source tile: the input gradient, and partial sums of the weight/bias and ``w1, w2`` gradients.
        The output tokens that see the tile are recomputed, a block at a time, not stored by
        ``_backward_rows``: for a narrow kernel, two float32 tensors written and read back cost more bytes
        than the ``x`` and ``grad_y`` they are recomputed from (see :func:`traffic_bytes`)."""
        tile = tl.program_id(0)
        i0 = tile * BLOCK
        h, b, w1, w2, lam_m, lam_v, lo, hi = _head(pos_weight, gate_mean, gate_var, T, NATS)
        sources = i0 + tl.arange(0, BLOCK)
        cols = tl.arange(0, BLOCK_D)
        inside = sources < T
        both = inside[:, None] & (cols < D)[None, :]
        # this tile as output tokens: the direct path, the weight/bias gradients, its share of the banded sums
        a, bq, sbar, d0, g_mu, _, _, _, xs, r, real, gy, xhat, m_ln, _ = _output_gradients(
            x, mask, grad_y, weight, mu_ln, var_ln, b, h, i0, i0, i0 + BLOCK, T, C, D, w1, w2, lo, hi, lam_m, lam_v,
            eps, HAS_MASK, BLOCK, BLOCK_D, DOT)
        part = ((b * H + h) * tl.num_programs(0) + tile) * 2 * BLOCK_D
        tl.store(affine_parts + part + cols, tl.sum(gy * xhat, axis=0))
        tl.store(affine_parts + part + BLOCK_D + cols, tl.sum(gy, axis=0))
        zero, zeros = tl.zeros([BLOCK], tl.float32), tl.zeros([BLOCK, BLOCK_D], tl.float32)
        g1, g2, g_w1, g_w2 = _transposed_sums(zeros, zeros, zero, zero, a, bq, sbar, d0, real > 0, sources, sources, xs,
                                              real, w1, w2, lo, hi, DOT)
        # the other output tokens that see it, recomputed a tile-aligned block at a time
        first = tl.maximum(i0 + lo, 0)
        last = tl.minimum(i0 + BLOCK + hi, T)
        for j0 in range(first // BLOCK * BLOCK, last, BLOCK):
            if j0 != i0:
                row_first, row_last = tl.maximum(first, j0), tl.minimum(last, j0 + BLOCK)
                row_a, row_b, row_sbar, row_d0, _, _, _, _, _, _, row_real, _, _, _, _ = _output_gradients(
                    x, mask, grad_y, weight, mu_ln, var_ln, b, h, j0, row_first, row_last, T, C, D, w1, w2, lo, hi,
                    lam_m, lam_v, eps, HAS_MASK, BLOCK, BLOCK_D, DOT)
                g1, g2, g_w1, g_w2 = _transposed_sums(g1, g2, g_w1, g_w2, row_a, row_b, row_sbar, row_d0, row_real > 0,
                                                      j0 + tl.arange(0, BLOCK), sources, xs, real, w1, w2, lo, hi, DOT)
        kpart = ((b * H + h) * tl.num_programs(0) + tile) * 2
        tl.store(kernel_parts + kpart, tl.sum(g_w1, axis=0))
        tl.store(kernel_parts + kpart + 1, tl.sum(g_w2, axis=0))
        # the direct path (dL/dxs = g_xhat rstd = -g_mu); d(m xs)/dxs = m, d(m xs^2)/dxs = 2 m xs
        g_xs = real[:, None] * (g1 + 2.0 * xs * g2) - g_mu
        # LayerNorm statistics: every head's share, summed over the heads of each token
        g_mu_ln = tl.load(ln_grads + 2 * (b * T + sources), mask=inside, other=0.0)
        g_var_ln = tl.load(ln_grads + 2 * (b * T + sources) + 1, mask=inside, other=0.0)
        g_xs += g_mu_ln[:, None] / C + (2.0 / (C - 1.0)) * g_var_ln[:, None] * (xs - m_ln[:, None])
        g_xs = tl.where(both, g_xs, 0.0)
        # RMS pre-scaling: dx = r (g - xs mean_c(g xs))
        dot = tl.sum(g_xs * xs, axis=1) / D
        offsets = (b * T + sources.to(tl.int64))[:, None] * C + h * D + cols[None, :]
        tl.store(grad_x + offsets, r[:, None] * (g_xs - xs * dot[:, None]), mask=both)


def _launch_shape(x: Tensor, num_heads: int) -> tuple[int, int, int, int, int]:
    B, T, C = x.shape
    D = C // num_heads
    return B, T, C, D, triton.cdiv(T, BLOCK)


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def normalize(norm, x: Tensor, mask: Tensor | None) -> Tensor:
    """The ``fused`` path: DTN of ``x`` with the parameters of ``norm`` (a ``DynamicTokenNorm``)."""
    check_device(x)
    return FusedDTN.apply(x, norm.pos_proj.weight, norm.pos_proj.bias, norm.mean_gate(), norm.gate_var, norm.weight,
                          norm.bias, mask, norm.num_heads, norm.eps)


if triton is not None:
    PATHS.register("fused")(normalize)
    DEVICE_PATHS["cuda"] = normalize  # what ``auto`` takes for CUDA tensors


class FusedDTN(torch.autograd.Function):
    """Saves only its inputs and LayerNorm's per-token statistics; backward recomputes the banded sums."""

    @staticmethod
    def forward(ctx, x, pos_weight, pos_bias, gate_mean, gate_var, weight, bias, mask, num_heads, eps):
        x = x.contiguous()
        B, T, C, D, tiles = _launch_shape(x, num_heads)
        mask_u8 = None if mask is None else mask.contiguous().view(torch.uint8)
        mask_arg = x if mask_u8 is None else mask_u8
        mu_ln = torch.empty(B, T, device=x.device, dtype=torch.float32)
        var_ln = torch.empty_like(mu_ln)
        pos_weight_c = pos_weight.detach().contiguous()
        _ln_stats[(triton.cdiv(B * T, BLOCK),)](x, mu_ln, var_ln, B * T, C, D, num_heads, eps,
                                               BLOCK=BLOCK, BLOCK_D=_block_d(D))
        y = torch.empty_like(x)
        _forward[(tiles, num_heads, B)](
            x, mask_arg, pos_weight_c, gate_mean.detach(), gate_var.detach(), weight.detach(), bias.detach(),
            mu_ln, var_ln, y, T, C, D, eps,
            HAS_MASK=mask is not None, NATS=SUPPORT_NATS, BLOCK=BLOCK, BLOCK_D=_block_d(D), DOT=DOT_PRECISION,
            num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        )
        ctx.save_for_backward(x, pos_weight_c, pos_bias, gate_mean, gate_var, weight, bias, mu_ln, var_ln)
        ctx.mask, ctx.num_heads, ctx.eps = mask_u8, num_heads, eps
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, pos_weight, pos_bias, gate_mean, gate_var, weight, bias, mu_ln, var_ln = ctx.saved_tensors
        H, eps, mask = ctx.num_heads, ctx.eps, ctx.mask
        B, T, C, D, tiles = _launch_shape(x, H)
        BD = _block_d(D)
        grad_y = grad_y.contiguous()
        mask_arg = x if mask is None else mask
        f32 = dict(device=x.device, dtype=torch.float32)
        ln_grads = torch.empty(B, T, H, 2, **f32)
        gate_parts = torch.empty(B, H, tiles, 2, **f32)
        meta = dict(HAS_MASK=mask is not None, NATS=SUPPORT_NATS, BLOCK=BLOCK, BLOCK_D=BD, DOT=DOT_PRECISION,
                    num_warps=NUM_WARPS, num_stages=NUM_STAGES)
        gates = (gate_mean.detach(), gate_var.detach())
        inputs = (x, mask_arg, grad_y, pos_weight, *gates, weight.detach(), mu_ln, var_ln)
        _backward_rows[(tiles, H, B)](*inputs, ln_grads, gate_parts, T, C, D, H, eps, **meta)
        grad_x = torch.empty_like(x)
        affine_parts = torch.empty(B, H, tiles, 2, BD, **f32)
        kernel_parts = torch.empty(B, H, tiles, 2, **f32)
        _backward_sources[(tiles, H, B)](*inputs, ln_grads.sum(dim=2), grad_x, affine_parts, kernel_parts,
                                         T, C, D, H, eps, **meta)
        affine = affine_parts.sum(dim=(0, 2))[..., :D]  # (H, 2, D)
        gate_grads = gate_parts.sum(dim=(0, 2))  # (H, 2): d/d lam_m, d/d lam_v
        lam_m, lam_v = torch.sigmoid(gate_mean.float()), torch.sigmoid(gate_var.float())
        grad_gate_mean = (gate_grads[:, 0] * lam_m * (1 - lam_m)).to(gate_mean.dtype)
        grad_gate_var = (gate_grads[:, 1] * lam_v * (1 - lam_v)).to(gate_var.dtype)
        grad_pos = kernel_parts.double().sum(dim=(0, 2)).to(pos_weight.dtype)
        return (
            grad_x, grad_pos, torch.zeros_like(pos_bias), grad_gate_mean, grad_gate_var,
            affine[:, 0].reshape(C).to(weight.dtype), affine[:, 1].reshape(C).to(bias.dtype),
            None, None, None,
        )


def support_interval(w1: float, w2: float, length: int) -> tuple[int, int]:
    """The offsets ``lo ... hi`` the kernels loop over for a head with logits ``w1 d + w2 d^2``: the host
    twin of ``_support`` (float64 here as there), for reports; the kernels never call it."""
    far = length - 1
    if w2 < 0:
        root = math.sqrt(max(w1 * w1 - 4.0 * w2 * SUPPORT_NATS, 0.0))
        lo, hi = (root - w1) / (2.0 * w2), (-root - w1) / (2.0 * w2)
    else:
        lo = -SUPPORT_NATS / w1 if w2 == 0 and w1 > 0 else -far
        hi = SUPPORT_NATS / -w1 if w2 == 0 and w1 < 0 else far
    return int(min(max(math.floor(lo) - 1, -far), 0)), int(max(min(math.ceil(hi) + 1, far), 0))


def support_width(pos_weight: Tensor, length: int) -> int:
    """Offsets in the widest head's support (``pos_weight``: ``pos_proj.weight``, ``(H, 2)``)."""
    intervals = [support_interval(w1, w2, length) for w1, w2 in pos_weight.detach().double().tolist()]
    return max(hi - lo + 1 for lo, hi in intervals)


def traffic_bytes(batch: int, length: int, dim: int, num_heads: int, support: int, itemsize: int = 4,
                  masked: bool = True, block: int | None = None) -> tuple[int, int]:
    """``(read, written)`` bytes of one forward + backward of the fused path, counted from what its
    kernels load and store (masked-off lanes move nothing), for activations of ``itemsize`` bytes,
    a kernel ``support`` offsets wide around 0 and tiles of ``block`` tokens (:data:`BLOCK`).

    Per (sequence, head, tile): the forward and ``_backward_rows`` load the tile's sources (the tile plus
    a halo of the support) once. ``_backward_sources`` recomputes every output token that sees its tile,
    one tile-aligned block at a time, each block loading the sources, statistics and ``grad_y`` of just
    the rows it needs; it writes ``grad_x``. The rest is per-token or per-program scalars."""
    block = BLOCK if block is None else block
    B, T, C, H, a = batch, length, dim, num_heads, itemsize
    D, tiles = C // H, -(-T // block)
    BD = max(16, 1 << (D - 1).bit_length())
    support = min(support, 2 * T - 1)
    lo = -((support - 1) // 2)  # centred on 0; only the width matters away from the sequence's ends
    hi = lo + support - 1
    mask_byte = 1 if masked else 0
    params = 2 * 8 + 2 * 4  # w1, w2, the two gates

    def sources(first: int, last: int) -> int:
        """Bytes ``_inter_token`` loads for the output rows ``first ... last - 1``."""
        return (min(last - lo, T) - max(first - hi, 0)) * (D * a + mask_byte)

    def output_rows(first: int, last: int) -> int:
        """Bytes ``_output_gradients`` loads: the rows' sources, statistics (mean, variance), grad_y; weight."""
        return sources(first, last) + (last - first) * (8 + D * a) + D * 4

    read = written = 0
    read += B * T * C * a  # _ln_stats: x
    written += B * T * 8  # mean, variance
    for tile in range(tiles):
        j0, rows = tile * block, min(block, T - tile * block)
        # _forward: sources; mean, variance; weight, bias -> y
        read += B * H * (params + sources(j0, j0 + rows) + rows * 8 + 2 * D * 4)
        written += B * H * rows * D * a
        # _backward_rows: its rows -> 2 LayerNorm grads per token; 2 gate partials
        read += B * H * (params + output_rows(j0, j0 + rows))
        written += B * H * (rows * 8 + 8)
        # _backward_sources: its rows, then every other block of output tokens that sees the tile; the tile's
        # LayerNorm grads (summed over the heads by torch) -> grad_x; affine and kernel partials
        first, last = max(j0 + lo, 0), min(j0 + block + hi, T)
        seen = sum(output_rows(max(first, r0), min(last, r0 + block))
                   for r0 in range(first // block * block, last, block) if r0 != j0)
        read += B * H * (params + output_rows(j0, j0 + rows) + seen + rows * 8)
        written += B * H * (rows * D * a + 2 * BD * 4 + 8)
    # by torch: the LayerNorm grads summed over the heads; the partial sums of affine (2 BD), gates, kernel
    parts = B * T * H * 8 + B * H * tiles * (2 * BD + 4) * 4
    return read + parts, written + B * T * 8 + C * 2 * 4 + H * 4 * 4
