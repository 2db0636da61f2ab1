"""The parts every LRA encoder shares; only the attention differs between models.

Follows the official Flax ``TransformerEncoder`` (spec §6): token embedding N(0, 1), a learned
zero-initialised CLS vector, sinusoidal or learned positions, dropout, pre-norm blocks with
bias-free attention projections, a final norm, then pooling and an MLP head. Every norm slot is
``build_norm(norm, emb_dim, num_heads, norm_grid)`` (the task's image grid, for DTN's 2-D prior) and
is called as ``norm(x, mask)``.

An attention is a class registered in :data:`MODELS` and built as ``cls(cfg, layer, seed)``; it maps
``(x: (B, T, D), mask: (B, T) bool)`` to ``(B, T, D)`` and must ignore keys where ``mask`` is false. Its
``official_settings`` are the config values its official code really trained with, whatever a task's
config said (:func:`official_config`). The official code's bugs are one switch away
(``official_quirks``, :mod:`models.quirks`).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from lra_dtn.config import ModelConfig
from lra_dtn.norms import build_norm, check_pooling, masked_token_mean
from lra_dtn.registry import Registry
from models.quirks import Quirks

MODELS: Registry[type[nn.Module]] = Registry("model")


def sinusoidal_table(length: int, dim: int) -> Tensor:
    """The official ``sinusoidal_init``: sin on even channels, cos on odd ones, computed in float64
    (numpy, officially) and stored as float32."""
    position = torch.arange(length, dtype=torch.float64).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div)[:, : dim // 2]
    return table.float()


class Embedding(nn.Module):
    """Tokens (+ CLS) + positions, then dropout. Returns the embedded sequence and its mask.

    With ``official_quirks`` the mask is the official one: every batch padded to ``max_len``, the mask
    ``ids > 0`` (pixel value 0 is padding on image tasks) and the CLS token masked like token 0."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.quirks = Quirks.of(cfg)
        self.max_len = cfg.max_len
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        nn.init.normal_(self.tokens.weight, std=1.0)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.emb_dim)) if cfg.pooling == "cls" else None
        positions = cfg.encoder_length
        if cfg.pos_emb == "learned":
            self.positions = nn.Parameter(torch.randn(positions, cfg.emb_dim) * 0.02)
        else:  # "sinusoidal" (ModelConfig checks the choice)
            self.register_buffer("positions", sinusoidal_table(positions, cfg.emb_dim), persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        if ids.shape[1] > self.max_len:
            raise ValueError(f"sequence of {ids.shape[1]} tokens exceeds max_len {self.max_len}")
        if self.quirks.pads_to_max_len:
            ids = F.pad(ids, (0, self.max_len - ids.shape[1]))  # token 0 is the padding id of every task
            mask = F.pad(mask, (0, self.max_len - mask.shape[1]), value=False)
        if self.quirks.mask_is_nonzero_ids:
            mask = ids > 0
        x = self.tokens(ids)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
            cls_mask = mask[:, :1] if self.quirks.cls_copies_first_mask else torch.ones_like(mask[:, :1])
            mask = torch.cat([cls_mask, mask], dim=1)
        return self.dropout(x + self.positions[: x.shape[1]]), mask


class QKVProjection(nn.Module):
    """Bias-free, xavier-uniform Q/K/V/O projections shared by every attention (official MHA)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.qkv_dim % cfg.num_heads:
            raise ValueError(f"qkv_dim {cfg.qkv_dim} is not divisible by num_heads {cfg.num_heads}")
        self.heads = cfg.num_heads
        self.to_q = nn.Linear(cfg.emb_dim, cfg.qkv_dim, bias=False)
        self.to_k = nn.Linear(cfg.emb_dim, cfg.qkv_dim, bias=False)
        self.to_v = nn.Linear(cfg.emb_dim, cfg.qkv_dim, bias=False)
        self.to_out = nn.Linear(cfg.qkv_dim, cfg.emb_dim, bias=False)
        for linear in (self.to_q, self.to_k, self.to_v, self.to_out):
            nn.init.xavier_uniform_(linear.weight)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, T, D) -> 3 x (B, H, T, d)``."""
        return tuple(rearrange(p(x), "b t (h d) -> b h t d", h=self.heads) for p in (self.to_q, self.to_k, self.to_v))

    def merge(self, out: Tensor) -> Tensor:
        """``(B, H, T, d) -> (B, T, D)`` through the output projection."""
        return self.to_out(rearrange(out, "b h t d -> b t (h d)"))


class FeedForward(nn.Sequential):
    """Dense(mlp) -> GELU (tanh, Flax default) -> Dropout -> Dense(emb) -> Dropout."""

    def __init__(self, cfg: ModelConfig) -> None:
        up, down = nn.Linear(cfg.emb_dim, cfg.mlp_dim), nn.Linear(cfg.mlp_dim, cfg.emb_dim)
        for linear in (up, down):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.normal_(linear.bias, std=1e-6)
        super().__init__(up, nn.GELU(approximate="tanh"), nn.Dropout(cfg.dropout), down, nn.Dropout(cfg.dropout))


class Block(nn.Module):
    """Pre-norm residual block: ``x + drop(attn(norm(x)))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: ModelConfig, attention: nn.Module, norm: str) -> None:
        super().__init__()
        self.attn_norm = build_norm(norm, cfg.emb_dim, cfg.num_heads, cfg.norm_grid)
        self.attention = attention
        self.dropout = nn.Dropout(cfg.dropout)
        self.mlp_norm = build_norm(norm, cfg.emb_dim, cfg.num_heads, cfg.norm_grid)
        self.mlp = FeedForward(cfg)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.dropout(self.attention(self.attn_norm(x, mask), mask))
        return x + self.mlp(self.mlp_norm(x, mask))


class Encoder(nn.Module):
    """Embedding, ``num_layers`` blocks of one attention class, final norm, pooling."""

    def __init__(self, cfg: ModelConfig, attention_cls: type[nn.Module], norm: str, seed: int = 0) -> None:
        super().__init__()
        self.pooling = cfg.pooling
        self.mean_counts_padding = Quirks.of(cfg).mean_counts_padding
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg, attention_cls(cfg, layer, seed), norm) for layer in range(cfg.num_layers))
        check_pooling(norm, cfg.pooling)
        self.final_norm = build_norm(norm, cfg.emb_dim, cfg.num_heads, cfg.norm_grid)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """``(B, T)`` token ids and mask -> pooled ``(B, D)``."""
        x, mask = self.embed(ids, mask)
        for block in self.blocks:
            x = block(x, mask)
        return pool(self.final_norm(x, mask), mask, self.pooling, self.mean_counts_padding)


def pool(x: Tensor, mask: Tensor, mode: str, count_padding: bool = False) -> Tensor:
    """``cls``: the prepended CLS token; ``first``: position 0 of the sequence itself (what the official
    dual encoder's "CLS" reads, having no CLS token); ``mean``: over real tokens only, or over every
    position when ``count_padding`` (the official MEAN, an official quirk). ``ModelConfig`` admits only
    these (``config.POOLINGS``)."""
    if mode == "mean":
        return x.mean(1) if count_padding else masked_token_mean(x, mask).squeeze(1)
    return x[:, 0]


#: JAX's truncated normal is cut at 2 standard deviations and rescaled so its std is the one asked for.
TRUNCATED_STD = 0.87962566103423978


def lecun_normal_(linear: nn.Linear) -> nn.Linear:
    """Flax ``Dense``'s default init: kernel ``lecun_normal`` (truncated normal, std ``1/sqrt(fan_in)``),
    bias zero."""
    std = 1.0 / math.sqrt(linear.in_features) / TRUNCATED_STD
    nn.init.trunc_normal_(linear.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(linear.bias)
    return linear


def mlp_head(widths: list[int]) -> nn.Sequential:
    """Dense -> ReLU -> ... -> Dense over the given widths (official ``classifier_head``, Flax's init)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [lecun_normal_(nn.Linear(a, b))] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


class Classifier(nn.Module):
    """One sequence -> logits: encoder, then Dense(mlp) -> ReLU -> Dense(classes)."""

    def __init__(self, cfg: ModelConfig, attention_cls: type[nn.Module], norm: str, seed: int = 0) -> None:
        super().__init__()
        self.encoder = Encoder(cfg, attention_cls, norm, seed)
        self.head = mlp_head([cfg.emb_dim, cfg.mlp_dim, cfg.num_classes])

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.head(self.encoder(ids, mask))


class DualClassifier(nn.Module):
    """Two documents -> logits through one shared encoder (two towers, one set of weights).

    ``dual_head="concat"``: the official ``[u, v]`` -> Dense(mlp) -> ReLU -> Dense(mlp/2) -> ReLU ->
    Dense(classes); ``"nli"``: ``[u, v, u*v, u-v]`` into the same MLP (the common reimplementation)."""

    def __init__(self, cfg: ModelConfig, attention_cls: type[nn.Module], norm: str, seed: int = 0) -> None:
        super().__init__()
        self.interaction = cfg.dual_head
        self.encoder = Encoder(cfg, attention_cls, norm, seed)
        width = cfg.emb_dim * (2 if cfg.dual_head == "concat" else 4)
        self.head = mlp_head([width, cfg.mlp_dim, cfg.mlp_dim // 2, cfg.num_classes])

    def forward(self, ids: Tensor, mask: Tensor, ids2: Tensor, mask2: Tensor) -> Tensor:
        u, v = self.encoder(ids, mask), self.encoder(ids2, mask2)
        features = [u, v] if self.interaction == "concat" else [u, v, u * v, u - v]
        return self.head(torch.cat(features, dim=-1))


def official_config(name: str, task_config: ModelConfig) -> ModelConfig:
    """A task's official config for encoder ``name`` with the settings that encoder's official code really
    ran (e.g. no attention dropout where the official attention has none): the official preset's model."""
    return dataclasses.replace(task_config, **MODELS.get(name).official_settings)


def build_model(name: str, cfg: ModelConfig, norm: str, seed: int = 0, dual: bool = False) -> nn.Module:
    """``--model`` name + config + ``--norm`` name -> a classifier (two towers when ``dual``)."""
    attention_cls = MODELS.get(name)
    return (DualClassifier if dual else Classifier)(cfg, attention_cls, norm, seed)
