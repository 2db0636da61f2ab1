"""Reformer: ``reformer-pytorch``'s LSH attention inside our own pre-norm block (spec §7.4).

The official LRA Reformer is the same composition: a plain pre-LN block whose attention is LSH
attention, so the block keeps its two norm slots for the normalizer under test. Official settings:
shared QK (keys are the queries), ``n_hashes = 1`` and ``n_buckets = 10`` over the task's length.

Padding: like the official code, every sequence is padded to the canonical length (``max_len``, plus
the CLS token, rounded up to an even number of buckets) inside the attention, and (corrected mode)
padded positions enter as zero vectors. LSH is not mask-exact the way dense attention is: the bucket
count sets the random rotations' shape, and padded tokens take chunk slots. At a fixed length with
fixed padding content an example's output depends on its own tokens only, not on the batch it was
padded with (so evaluation does not depend on the eval batch size).

Hashing draws fresh random rotations at every training step (the package's behaviour, which the
Reformer paper relies on). In evaluation the rotations come from a generator seeded by
``(seed, layer)``, so evaluation is deterministic (the official code uses a fixed ``PRNGKey(0)``
for training and evaluation alike).

Cost: every query sees ``2 · bucket_size`` keys (its chunk and the one before), at the canonical
length. The official chunk grows with ``max_len``, so the attention costs ``T^2 / 5``; for the
Reformer paper's linear regime, give buckets of ~64 tokens (``n_buckets = max_len / 64``), as
``benchmarks/encoders.py`` does.

Official quirks, corrected by default and restored by ``official_quirks`` (:mod:`models.quirks`):
the logits are multiplied by ``sqrt(d)`` (here: divided); the padding mask is ignored, so padding (every
example padded to ``max_len``, plus 1-10 zero positions, ``chunk_len = 10``) is hashed and attended to;
q/k/v have the width of the input (``emb_dim``; ``qkv_dim`` is ignored) and there is no output
projection; the rotations are fixed (``PRNGKey(0)``: the same in every layer, head and step, in
training too). The official code never applies attention dropout (``dropout_rate`` is accepted and
unused): the official preset sets ``attn_dropout = 0`` (``official_settings``).

Differences of ``reformer-pytorch`` from the official LSH that no switch undoes: keys are unit-normalised
before the dot product (official: ``length_norm=False``), and a query attends to itself only when no
other key is in reach (logit -5e4; official: no self-mask). The rotations are drawn by torch, not JAX,
so even fixed ones are not the official numbers.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from einops import rearrange
from reformer_pytorch.reformer_pytorch import LSHAttention
from torch import Tensor, nn

from lra_dtn.config import ModelConfig
from models.blocks import MODELS, QKVProjection
from models.quirks import Quirks


class SharedQKProjection(QKVProjection):
    """``QKVProjection`` with one projection for queries and keys (Reformer's shared QK).

    ``to_k`` is removed rather than left unused, so every parameter still receives a gradient. Official
    quirks: the q/k/v width is ``emb_dim`` and the heads are concatenated with no output projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        quirks = Quirks.of(cfg)
        super().__init__(replace(cfg, qkv_dim=cfg.emb_dim) if quirks.qkv_width_is_emb_dim else cfg)
        del self.to_k
        if quirks.no_output_projection:
            self.to_out = nn.Identity()

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, T, D) -> 2 x (B, H, T, d)``: the shared query/key and the value."""
        return tuple(rearrange(p(x), "b t (h d) -> b h t d", h=self.heads) for p in (self.to_q, self.to_v))


class SeededLSHAttention(LSHAttention):
    """``LSHAttention`` whose random rotations come from ``rotation_seed`` in evaluation (and in training
    too when ``fixed_in_training``), without touching the global generator or attention dropout."""

    def __init__(self, rotation_seed: int, fixed_in_training: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rotation_seed = rotation_seed
        self.fixed_in_training = fixed_in_training

    def hash_vectors(self, n_buckets: int, vecs: Tensor, **kwargs) -> Tensor:
        if self.training and not self.fixed_in_training:
            return super().hash_vectors(n_buckets, vecs, **kwargs)
        cuda = vecs.device.type == "cuda"
        with torch.random.fork_rng(devices=[vecs.device.index or 0] if cuda else []):
            if cuda:
                with torch.cuda.device(vecs.device):
                    torch.cuda.manual_seed(self.rotation_seed)
            else:
                torch.random.default_generator.manual_seed(self.rotation_seed)
            return super().hash_vectors(n_buckets, vecs, **kwargs)


@MODELS.register("reformer")
class ReformerAttention(nn.Module):
    """Shared-QK LSH attention (``reformer_pytorch.LSHAttention``), heads folded into the batch."""

    #: What the official code trained with, whatever the task's config said (applied by the official preset).
    official_settings = {"attn_dropout": 0.0}  # reformer_attention.py never uses its dropout_rate

    def __init__(self, cfg: ModelConfig, layer: int = 0, seed: int = 0) -> None:
        super().__init__()
        if cfg.n_buckets < 2 or cfg.n_buckets % 2:
            raise ValueError(f"n_buckets must be even and >= 2 (angular LSH), got {cfg.n_buckets}")
        quirks = Quirks.of(cfg)
        self.proj = SharedQKProjection(cfg)
        self.ignores_mask = quirks.ignores_mask
        self.logits_times_sqrt_d = quirks.logits_times_sqrt_d
        # official: the length padded with 1 to chunk_len = 10 positions before it is cut into buckets.
        length = (cfg.encoder_length // 10 + 1) * 10 if quirks.whole_padding_chunk else cfg.encoder_length
        self.bucket_size = math.ceil(length / cfg.n_buckets)
        # LSHAttention needs a multiple of 2 buckets (its rotations give +-projections in pairs).
        self.canonical_len = math.ceil(length / (2 * self.bucket_size)) * 2 * self.bucket_size
        self.lsh = SeededLSHAttention(
            rotation_seed=0 if quirks.fixed_rotations else seed * 1_000_003 + layer,
            fixed_in_training=quirks.fixed_rotations,
            dropout=cfg.attn_dropout, bucket_size=self.bucket_size, n_hashes=cfg.n_hashes, causal=False,
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        heads, length = self.proj.heads, x.shape[1]
        if length > self.canonical_len:
            raise ValueError(f"sequence of {length} tokens is longer than max_len allows ({self.canonical_len})")
        # Padded positions enter as zero vectors, whatever the batch held (official quirk: as they come,
        # since the official code lets padding into the attention).
        qk, v = self.proj.split(x if self.ignores_mask else x * mask[..., None])
        pad = self.canonical_len - length
        qk, v = (rearrange(F.pad(t, (0, 0, 0, pad)), "b h t d -> (b h) t d") for t in (qk, v))
        mask = None if self.ignores_mask else F.pad(mask, (0, pad), value=False).repeat_interleave(heads, dim=0)
        if self.logits_times_sqrt_d:
            # The package scales by d^-1/2; the official code by d^+1/2. Hashing is scale-invariant.
            qk = qk * qk.shape[-1]
        out, _, _ = self.lsh(qk, v, input_mask=mask)
        out = rearrange(out, "(b h) t d -> b h t d", h=heads)[:, :, :length]
        return self.proj.merge(out)
