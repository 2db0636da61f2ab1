"""The vanilla Transformer: dense softmax attention through PyTorch's fused kernel."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lra_dtn.config import ModelConfig
from models.blocks import MODELS, QKVProjection
from models.quirks import Quirks


@MODELS.register("transformer")
class DenseAttention(nn.Module):
    """Full attention, ``softmax(q k^T / sqrt(d)) v``; padded keys are excluded for every query.

    With ``official_quirks`` a masked query is masked as flax's ``make_padding_mask`` does: all its logits
    are -1e10, so its softmax is uniform and its output the mean of every value (padding included). Only
    MEAN pooling with padding counted (also an official quirk) ever reads such an output."""

    #: What the official code trained with, whatever the task's config said: the config as it is (flax
    #: ``SelfAttention`` applies ``attention_dropout_rate``).
    official_settings: dict = {}

    def __init__(self, cfg: ModelConfig, layer: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.proj = QKVProjection(cfg)
        self.attn_dropout = cfg.attn_dropout
        self.masks_queries = Quirks.of(cfg).masks_queries

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        q, k, v = self.proj.split(x)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None, None, :], dropout_p=self.attn_dropout if self.training else 0.0
        )
        if self.masks_queries:
            out = torch.where(mask[:, None, :, None], out, v.mean(dim=2, keepdim=True))
        return self.proj.merge(out)
