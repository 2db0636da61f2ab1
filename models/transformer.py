"""The vanilla Transformer: dense softmax attention through PyTorch's fused kernel."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lra_dtn.config import ModelConfig
from models.blocks import MODELS, QKVProjection


@MODELS.register("transformer")
class DenseAttention(nn.Module):
    """Full attention, ``softmax(q k^T / sqrt(d)) v``; padded keys are excluded for every query."""

    def __init__(self, cfg: ModelConfig, layer: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.proj = QKVProjection(cfg)
        self.attn_dropout = cfg.attn_dropout

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        q, k, v = self.proj.split(x)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None, None, :], dropout_p=self.attn_dropout if self.training else 0.0
        )
        return self.proj.merge(out)
