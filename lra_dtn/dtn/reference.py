"""The dense float64 reference of ``specs/dtn.md``: the judge every fast DTN path is tested against.

Written from the spec alone, step by step, with a ``(B, H, T, T)`` softmax: quadratic in ``T``, so for
tests only. Differentiable in ``x`` and in every parameter, so it also gives the reference gradients.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def reference(params: dict[str, Tensor], x: Tensor, mask: Tensor | None, heads: int, eps: float) -> Tensor:
    """DTN of ``x`` ``(B, T, C)``, parameters named as the module's (``gate_mean`` absent for ``dtn_var``)."""
    B, T, C = x.shape
    xh = x.view(B, T, heads, C // heads)
    xh = xh / torch.sqrt(xh.square().mean(-1, keepdim=True) + eps)  # 1. per-head RMS pre-scaling
    xs = xh.reshape(B, T, C)
    mu_ln, var_ln = xs.mean(-1), xs.var(-1)  # 2. unbiased, as torch.var
    d = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).to(x)  # j - i
    w, b = params["pos_proj.weight"], params["pos_proj.bias"]
    logits = (w[:, 0, None, None] * d + w[:, 1, None, None] * d * d + b[:, None, None]).expand(B, heads, T, T)
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], -math.inf)
    P = torch.softmax(logits, dim=-1)  # 3.
    per_head = xh.permute(0, 2, 1, 3)
    mu_in = (P @ per_head).permute(0, 2, 1, 3)
    var_in = (P @ per_head.square()).permute(0, 2, 1, 3) - mu_in.square()
    lam_m = torch.sigmoid(params["gate_mean"]) if "gate_mean" in params else torch.ones_like(params["gate_var"])
    lam_v = torch.sigmoid(params["gate_var"])
    mu = lam_m[:, None] * mu_ln[..., None, None] + (1 - lam_m)[:, None] * mu_in  # 4.
    var = lam_v[:, None] * var_ln[..., None, None] + (1 - lam_v)[:, None] * var_in
    y = ((xh - mu) / torch.sqrt(var + eps)).reshape(B, T, C)  # 5.
    return y * params["weight"] + params["bias"]


def dense_reference(norm, x: Tensor, mask: Tensor | None) -> Tensor:
    """The reference of ``norm``'s prior (:func:`reference`, or :func:`grid_reference` for the 2-D one)
    in float64 with the (detached) parameters of ``norm``, a DTN module."""
    params = {name: p.detach().double() for name, p in norm.named_parameters()}
    return prior_reference(norm, params, x.double(), mask)


def reference_gradients(norm, x: Tensor, mask: Tensor | None, grad_y: Tensor) -> dict[str, Tensor]:
    """float64 gradients of ``<reference(x), grad_y>``: ``"x"`` and every parameter of ``norm`` by name."""
    params = {name: p.detach().double().requires_grad_() for name, p in norm.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    prior_reference(norm, params, x64, mask).backward(grad_y.double())
    return {"x": x64.grad, **{name: p.grad for name, p in params.items()}}


def prior_reference(norm, params: dict[str, Tensor], x: Tensor, mask: Tensor | None) -> Tensor:
    """:func:`reference` or, for a module with the 2-D prior, :func:`grid_reference`, with ``params``."""
    if norm.prior == "2d":
        return grid_reference(params, x, mask, norm.num_heads, norm.grid, norm.eps)
    return reference(params, x, mask, norm.num_heads, norm.eps)


def grid_reference(params: dict[str, Tensor], x: Tensor, mask: Tensor | None, heads: int, grid: tuple[int, int],
                   eps: float) -> Tensor:
    """DTN with the 2-D prior, from the authors' formula: the features ``(dx, dy, dx^2 + dy^2)`` of output
    minus source position through ``pos_proj``, a ``(B, H, G, G)`` softmax over the real source pixels of
    the last ``G = rows * cols`` tokens. Tokens before the grid (CLS) take the LayerNorm statistics
    alone (the rule of :func:`lra_dtn.dtn.grid.grid_dtn`)."""
    B, T, C = x.shape
    rows, cols = grid
    G, D = rows * cols, C // heads
    prefix = T - G
    xh = x.view(B, T, heads, D)
    xh = xh / torch.sqrt(xh.square().mean(-1, keepdim=True) + eps)  # 1.
    xs = xh.reshape(B, T, C)
    mu_ln, var_ln = xs.mean(-1)[..., None, None], xs.var(-1)[..., None, None]  # 2.
    y, x_ = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    pos = torch.stack([x_.flatten(), y.flatten()], dim=-1)
    d = (pos[:, None] - pos[None, :]).to(x)  # (output, source, [dx, dy])
    features = torch.cat([d, d.square().sum(-1, keepdim=True)], dim=-1)
    logits = F.linear(features, params["pos_proj.weight"], params["pos_proj.bias"]).permute(2, 0, 1)
    logits = logits.expand(B, heads, G, G)
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, prefix:], -math.inf)
    P = torch.softmax(logits, dim=-1)  # 3.
    pixels = xh[:, prefix:].permute(0, 2, 1, 3)
    mu_in = (P @ pixels).permute(0, 2, 1, 3)
    var_in = (P @ pixels.square()).permute(0, 2, 1, 3) - mu_in.square()
    lam_m = torch.sigmoid(params["gate_mean"]) if "gate_mean" in params else torch.ones(heads).to(x)
    lam_v = torch.sigmoid(params["gate_var"])
    mu = torch.cat([mu_ln[:, :prefix].expand(-1, -1, heads, D),  # 4.
                    lam_m[:, None] * mu_ln[:, prefix:] + (1 - lam_m)[:, None] * mu_in], dim=1)
    var = torch.cat([var_ln[:, :prefix].expand(-1, -1, heads, D),
                     lam_v[:, None] * var_ln[:, prefix:] + (1 - lam_v)[:, None] * var_in], dim=1)
    return ((xh - mu) / torch.sqrt(var + eps)).reshape(B, T, C) * params["weight"] + params["bias"]  # 5.
