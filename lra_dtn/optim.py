"""The official optimizer and learning-rate schedules (spec §6).

Flax's Adam with ``weight_decay`` is decoupled decay on every parameter, i.e. ``torch.optim.AdamW``
with betas (0.9, 0.98) and eps 1e-9. One deliberate difference, from the DTN code: parameters of
normalizers (affine weights and biases, DTN's gates and positional projection) take no decay.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lra_dtn.config import TrainConfig
from lra_dtn.norms import Norm


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: every parameter of every :class:`Norm` without decay, the rest with it."""
    no_decay = {id(p) for m in model.modules() if isinstance(m, Norm) for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=learning_rate(0, cfg), betas=cfg.betas,
                             eps=cfg.eps)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """The official ``create_learning_rate_scheduler``: factors multiplied, step counted from 0.

    ``rsqrt``: lr * min(1, step/warmup) / sqrt(max(step, warmup)) (ListOps, Text, Retrieval);
    ``cosine``: lr * min(1, step/warmup) * 0.5 * (1 + cos(pi * progress)), progress from the end of
    warmup over all training steps (image tasks). The first update has lr 0, as in the original.
    ``TrainConfig`` admits only these two (``config.SCHEDULES``)."""
    warmup = min(1.0, step / cfg.warmup) if cfg.warmup > 0 else 1.0
    if cfg.schedule == "rsqrt":
        return cfg.lr * warmup / math.sqrt(max(step, cfg.warmup, 1))
    progress = max(0.0, (step - cfg.warmup) / cfg.steps)
    return cfg.lr * warmup * max(0.0, 0.5 * (1.0 + math.cos(math.pi * (progress % 1.0))))
