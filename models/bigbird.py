"""BigBird block-sparse attention (ITC pattern, LRA ``models/bigbird/bigbird_attention.py``, spec §7.3).

Keys and queries are cut into blocks of ``block_size`` (64). The first and the last block are global:
they attend to every block and every block attends to them. Every other query block attends to a
sliding window of 3 blocks (itself and its two neighbours) and to ``num_random_blocks`` (3) random
blocks. Cost is ``O(T · (5 + r) · block)``: linear in the length, with no ``T x T`` tensor. Each
query block's ``5 + r`` key blocks are gathered with one ``index_select`` and attended to by PyTorch's
fused kernel, one query block per batch entry.

The layout lives on the *canonical* block grid of the task, ``N = ceil((max_len [+1 CLS]) / block)``
blocks, exactly the grid the official code sees, since it pads every example to ``max_len``:

* the global blocks are canonical block 0 and canonical block ``N - 1``. A batch padded to fewer than
  ``N`` blocks has no last global block; it would hold nothing but padding;
* the random blocks of each row are drawn once, at construction, from ``(seed, layer, head)`` among the
  canonical blocks outside the window and the globals, so the graph is the same for every batch and
  step. A random block beyond the batch's length is dropped (it would be padding);
* full attention replaces the pattern when ``N`` is too small for it (``N <= 2 + 3 + r``).

All three decisions depend on the config alone, never on how much padding a batch carries, so a real
token's output does not change with extra padding. The price, as in the official code: a sequence much
shorter than ``max_len`` keeps its window and the first global block, but most of its random blocks
land in padding. Every real query sees at least its own block, so only padding queries can have no
valid key; they get zeros.

Official quirks, corrected by default and restored by ``official_quirks`` (:mod:`models.quirks`):
random blocks are drawn among the first ``1024 / block`` blocks only (``last_idx``; ListOps' 32 blocks
of 64 draw among blocks 1-15, and the last two middle rows among 1-11 and 1-12); a whole extra block
is appended when the length is already a multiple of the block (Pathfinder: 1024 tokens make 17
blocks, the last global one all padding); the blocks added to reach a block multiple are real keys
(zero vectors: logit 0, value 0); masked queries output zeros; the graph is seeded by the layer (and
head) only, not by the run's seed. The official sparse path applies no attention dropout: the official
preset sets ``attn_dropout = 0`` (``official_settings``); another value is honoured on both paths.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from lra_dtn.config import ModelConfig
from models.blocks import MODELS, QKVProjection
from models.quirks import Quirks

WINDOW = 3  # the sliding window in blocks: the query block and its two neighbours


def attend(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, dropout_p: float) -> Tensor:
    """``softmax(q k^T / sqrt(d)) v`` over the keys where ``key_valid`` (``(..., 1, Tk)``) is true.

    Masked keys get the most negative finite logit (an additive mask, which PyTorch's CPU kernel runs
    faster than a boolean one); a query with no valid key then averages padding, and is zeroed."""
    bias = torch.zeros(key_valid.shape, dtype=q.dtype, device=q.device)
    bias.masked_fill_(~key_valid, torch.finfo(q.dtype).min)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    return out * key_valid.any(dim=-1, keepdim=True)


def random_block_candidates(row: int, num_blocks: int, below: int | None) -> list[int]:
    """The blocks query block ``row`` may draw its random blocks from: ``1 .. N-2`` outside its window.

    ``below`` (official quirk): only blocks ``< below``; the official rows ``N-3`` and ``N-2`` then stop
    at ``below - 5`` and ``below - 4`` (their cases in ``get_block_rand_mask`` assume ``below = N``)."""
    limit = num_blocks - 2 if below is None else min(below - 1, num_blocks - 2)
    if below is not None and row >= num_blocks - 3:
        limit = min(limit, below - 5 + (row - (num_blocks - 3)))
    return [j for j in range(1, limit + 1) if abs(j - row) > 1]


def random_blocks(num_blocks: int, num_random: int, seed: list[int], below: int | None = None) -> Tensor:
    """``(num_blocks, r)`` random key blocks per query block, drawn from the integers ``seed``.

    Row ``i`` picks ``r`` distinct blocks among :func:`random_block_candidates`; the global rows 0 and
    ``N-1`` need none and hold ``-1``."""
    rng = np.random.default_rng(seed)
    rows = np.full((num_blocks, num_random), -1, dtype=np.int64)
    for i in range(1, num_blocks - 1):
        candidates = random_block_candidates(i, num_blocks, below)
        if len(candidates) < num_random:
            raise ValueError(f"block row {i} of {num_blocks} has {len(candidates)} candidate random blocks, "
                             f"fewer than num_random_blocks={num_random}")
        rows[i] = rng.choice(candidates, size=num_random, replace=False)
    return torch.from_numpy(rows)


@MODELS.register("bigbird")
class BigBirdAttention(nn.Module):
    """Block-sparse attention: global first/last blocks, a 3-block window and random blocks."""

    #: What the official code trained with, whatever the task's config said (applied by the official preset).
    official_settings = {"attn_dropout": 0.0}  # no dropout on the sparse path (sparse_dot_product_attention)

    def __init__(self, cfg: ModelConfig, layer: int = 0, seed: int = 0) -> None:
        super().__init__()
        quirks = Quirks.of(cfg)
        self.proj = QKVProjection(cfg)
        self.attn_dropout = cfg.attn_dropout
        self.block_size = cfg.block_size
        self.masks_queries = quirks.masks_queries
        self.canonical_len = cfg.encoder_length  # the Embedding's: max_len, plus one for a CLS token
        if quirks.whole_padding_block:
            self.num_blocks = self.canonical_len // cfg.block_size + 1
        else:
            self.num_blocks = math.ceil(self.canonical_len / cfg.block_size)
        # Keys added beyond the canonical length to fill the grid: real only under the official quirk.
        self.padding_is_real = quirks.padding_block_is_real
        self.dense = self.num_blocks <= 2 + WINDOW + cfg.num_random_blocks
        # official last_idx = min(padded length, 1024), effective only above two blocks.
        cap = min(self.num_blocks * cfg.block_size, 1024)
        below = cap // cfg.block_size if quirks.random_blocks_below_1024 and cap > 2 * cfg.block_size else None
        graph_seed = [layer] if quirks.graph_seeded_by_layer else [seed, layer]
        # Dense layers have no sparse pattern (and too few blocks to draw random ones from).
        graph = torch.zeros(cfg.num_heads, self.num_blocks, 0, dtype=torch.long) if self.dense else torch.stack(
            [random_blocks(self.num_blocks, cfg.num_random_blocks, [*graph_seed, h], below)
             for h in range(cfg.num_heads)]
        )
        # (H, N, r); a pure function of the config, seed and layer, so it is rebuilt rather than checkpointed.
        self.register_buffer("rand_blocks", graph, persistent=False)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        out = self.attend_layout(x, mask)
        return out * mask[..., None] if self.masks_queries else out

    def attend_layout(self, x: Tensor, mask: Tensor) -> Tensor:
        """The attention output of every position (dense when the grid is too small for the pattern)."""
        dropout_p = self.attn_dropout if self.training else 0.0
        if self.dense:
            q, k, v = self.proj.split(x)
            return self.proj.merge(attend(q, k, v, mask[:, None, None, :], dropout_p))
        length, bs = x.shape[1], self.block_size
        if length > self.canonical_len:
            raise ValueError(f"sequence of {length} tokens exceeds the {self.canonical_len} tokens of max_len")
        # A batch at the canonical length gets the whole grid (with the official quirk, one more block).
        nb = self.num_blocks if length == self.canonical_len else math.ceil(length / bs)
        pad = nb * bs - length
        q, k, v = self.proj.split(F.pad(x, (0, 0, 0, pad)))
        mask = F.pad(mask, (0, pad), value=False)
        if self.padding_is_real:
            mask[:, self.canonical_len:] = True
        last_global = nb == self.num_blocks  # the canonical last block exists in this batch
        # Global rows, the first block (and the last one, when present) against every key, in one call.
        global_q = torch.cat([q[:, :, :bs], q[:, :, -bs:]], dim=2) if last_global else q[:, :, :bs]
        global_out = attend(global_q, k, v, mask[:, None, None, :], dropout_p)
        outs = [global_out[:, :, :bs]]
        middle = slice(1, nb - 1 if last_global else nb)
        if middle.stop > middle.start:
            outs.append(self._sparse_rows(q, k, v, mask, middle, dropout_p))
        outs.append(global_out[:, :, bs:])  # empty without the last global block
        return self.proj.merge(torch.cat(outs, dim=2)[:, :, :length])

    def key_blocks(self, middle: slice, nb: int) -> tuple[Tensor, Tensor]:
        """Key blocks of the query rows ``middle``: ``(H, rows, 5 + r)`` indices and validity.

        Slots: first and last global, the window ``i-1, i, i+1``, then the random blocks. A slot is
        invalid when its block is beyond the batch (``>= nb``) or repeats a global block."""
        device, last = self.rand_blocks.device, self.num_blocks - 1
        rows = torch.arange(middle.start, middle.stop, device=device)
        globals_ = torch.tensor([0, last], device=device).expand(len(rows), 2)
        window = rows[:, None] + torch.arange(-1, 2, device=device)
        fixed = torch.cat([globals_, window], dim=1).expand(self.rand_blocks.shape[0], -1, -1)
        blocks = torch.cat([fixed, self.rand_blocks[:, middle]], dim=2)
        repeats_global = torch.zeros_like(blocks, dtype=torch.bool)
        repeats_global[..., 2:2 + WINDOW] = (window == 0) | (window == last)
        valid = (blocks < nb) & ~repeats_global
        return blocks.where(valid, 0), valid

    def _sparse_rows(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, middle: slice, dropout_p: float) -> Tensor:
        """Query blocks ``middle`` against their gathered key blocks; ``(B, H, rows * bs, d)``."""
        heads, bs = q.shape[1], self.block_size
        nb = q.shape[2] // bs
        blocks, slot_valid = self.key_blocks(middle, nb)
        # One flat index over (head, block) so the gather is an index_select (its backward an index_add).
        flat = (blocks + nb * torch.arange(heads, device=blocks.device)[:, None, None]).flatten()
        k_sel, v_sel = (
            rearrange(
                rearrange(t, "b h (n j) d -> b (h n) j d", j=bs).index_select(1, flat),
                "b (h m s) j d -> b (h m) (s j) d", h=heads, s=blocks.shape[2],
            )
            for t in (k, v)
        )
        mask_sel = rearrange(mask, "b (n j) -> b n j", j=bs)[:, blocks]  # (B, H, rows, slots, bs)
        key_valid = rearrange(mask_sel & slot_valid[None, ..., None], "b h m s j -> b (h m) 1 (s j)")
        q_rows = rearrange(q[:, :, middle.start * bs:middle.stop * bs], "b h (m i) d -> b (h m) i d", i=bs)
        out = attend(q_rows, k_sel, v_sel, key_valid, dropout_p)
        return rearrange(out, "b (h m) i d -> b h (m i) d", h=heads)
