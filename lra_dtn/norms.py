"""Token normalizers behind one registry: every norm slot of every encoder is ``NORMS.get(name)``.

A normalizer is an ``nn.Module`` built as ``cls(dim, num_heads)`` and called as ``norm(x, mask)``
with ``x`` of shape ``(B, T, C)`` and ``mask`` ``(B, T)``, true for real tokens (``None``: all real).
A norm that can use the image grid of the tokens (DTN's 2-D prior) sets ``takes_grid`` and is built as
``cls(dim, num_heads, grid=grid)``: ``(rows, cols)`` of the last ``rows * cols`` tokens, or ``None``.
Norms that only look inside one token ignore the mask; norms that pool over tokens (DTN, ``in``)
must never let padding into a real token's statistics. Adding a normalizer is one subclass of
:class:`Norm` with ``@NORMS.register("name")``; the optimizer exempts every parameter of every
``Norm`` from weight decay (see :mod:`lra_dtn.optim`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lra_dtn.registry import Registry


class Norm(nn.Module):
    """Base class: marks a module as a normalizer (no weight decay) and fixes the constructor.

    ``zero_token_mean``: the output's mean over the real tokens is the bias for every input (per-channel
    statistics over the sequence); the encoder refuses MEAN pooling after such a final norm.
    ``takes_grid``: built with ``grid=`` too (see the module docstring)."""

    zero_token_mean = False
    takes_grid = False

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError


NORMS: Registry[type[Norm]] = Registry("norm")


def check_pooling(name: str, pooling: str) -> None:
    """Refuse MEAN pooling after a final norm whose output has a zero mean over the tokens (its pooled
    vector would be its bias whatever the input); called by the encoder and when a run is planned."""
    if pooling == "mean" and NORMS.get(name).zero_token_mean:
        raise ValueError(f"norm {name!r} makes every channel's mean over the tokens zero, so MEAN pooling after "
                         "the final norm would see only its bias (the classifier could not depend on the input): "
                         "use --set model.pooling=cls")


def build_norm(name: str, dim: int, num_heads: int, grid: tuple[int, int] | None = None) -> Norm:
    """The one place a norm slot is filled: ``build_norm(norm, cfg.emb_dim, cfg.num_heads, cfg.norm_grid)``;
    the grid reaches only the norms that take it."""
    cls = NORMS.get(name)
    return cls(dim, num_heads, grid=grid) if cls.takes_grid else cls(dim, num_heads)


@NORMS.register("ln")
class LayerNorm(Norm):
    """LayerNorm over channels. eps 1e-6 as Flax's ``nn.LayerNorm`` in the official LRA code."""

    eps = 1e-6

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__(dim, num_heads)
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)


@NORMS.register("rms")
class RMSNorm(Norm):
    """RMSNorm (Zhang & Sennrich 2019): rescale by the root mean square, no centring, no bias."""

    eps = 1e-6

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__(dim, num_heads)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return F.rms_norm(x, (self.dim,), self.weight, self.eps)


@NORMS.register("scale")
class ScaleNorm(Norm):
    """ScaleNorm (Nguyen & Salazar 2019): ``g * x / ||x||`` with one scalar ``g`` init ``sqrt(C)``."""

    eps = 1e-5

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__(dim, num_heads)
        self.scale = nn.Parameter(torch.tensor(float(dim) ** 0.5))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.scale * x / x.norm(dim=-1, keepdim=True).clamp_min(self.eps)


def masked_token_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Per-sequence, per-channel mean over real tokens: ``(B, T, C) -> (B, 1, C)``.

    A sequence with no real token gets a zero mean instead of NaN (count clamped at 1)."""
    if mask is None:
        return x.mean(dim=1, keepdim=True)
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp_min(1.0)


@NORMS.register("in")
class InstanceNorm(Norm):
    """Instance-style norm for sequences: per-channel statistics over the *real* tokens only.

    This is DTN's inter-token branch with a flat kernel; padding never enters the statistics, so
    a real token's output does not depend on how much padding the batch carries."""

    eps = 1e-5
    zero_token_mean = True

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__(dim, num_heads)
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        stats_dtype = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(stats_dtype)
        mean = masked_token_mean(xf, mask)
        var = masked_token_mean((xf - mean) ** 2, mask)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        return (y * self.weight + self.bias).to(x.dtype)
