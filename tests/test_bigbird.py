"""BigBird block-sparse attention: equal to dense attention under the block mask of its layout."""
from __future__ import annotations

import math

import pytest
import torch

from lra_dtn.config import ModelConfig
from models.bigbird import WINDOW, BigBirdAttention
from models.transformer import DenseAttention

BLOCK = 4


def config(max_len: int = 63, **kw) -> ModelConfig:
    """Block 4 and CLS: 64 positions, so 16 canonical blocks (sparse, as 16 > 2 + 3 + 3)."""
    base = dict(vocab_size=11, num_classes=3, max_len=max_len, num_layers=1, emb_dim=24, qkv_dim=24, mlp_dim=16,
                num_heads=3, block_size=BLOCK, attn_dropout=0.0)
    return ModelConfig(**{**base, **kw})


def layout_mask(attn: BigBirdAttention, length: int) -> torch.Tensor:
    """``(H, T, T)`` token mask of the ITC pattern, written from its definition (not from the gather):
    canonical blocks 0 and N-1 are global rows and columns; row i also sees i-1..i+1 and its random
    blocks; blocks beyond the sequence do not exist."""
    heads, num_blocks = attn.rand_blocks.shape[:2]
    nb = math.ceil(length / BLOCK)
    allowed = torch.zeros(heads, nb, nb, dtype=torch.bool)
    for h in range(heads):
        for i in range(nb):
            if i in (0, num_blocks - 1):
                allowed[h, i] = True
                continue
            for j in [0, num_blocks - 1, i - 1, i, i + 1, *attn.rand_blocks[h, i].tolist()]:
                if 0 <= j < nb:
                    allowed[h, i, j] = True
    return allowed.repeat_interleave(BLOCK, 1).repeat_interleave(BLOCK, 2)[:, :length, :length]


def dense_reference(attn: BigBirdAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Explicit softmax attention under ``layout_mask & key mask``; rows with no key give zeros."""
    q, k, v = attn.proj.split(x)
    allowed = layout_mask(attn, x.shape[1])[None] & mask[:, None, None, :]
    logits = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~allowed, float("-inf"))
    return attn.proj.merge(torch.softmax(logits, dim=-1).nan_to_num(0.0) @ v)


@pytest.mark.parametrize("length", [64, 50, 23, 5])  # last global block present (64), absent, 2 blocks, 1
def test_equals_dense_attention_under_block_mask_forward_and_backward(length):
    torch.manual_seed(0)
    attn = BigBirdAttention(config(), layer=1, seed=3).double()
    assert not attn.dense and attn.num_blocks == 16
    x = torch.randn(3, length, 24, dtype=torch.double, requires_grad=True)
    mask = torch.ones(3, length, dtype=torch.bool)
    mask[1, length * 2 // 3:] = False
    mask[2, 1:] = False  # one real token: most query blocks see only padding but for block 0
    out, ref = attn(x, mask), dense_reference(attn, x, mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad((out * upstream).sum(), [x, *attn.parameters()])
    grads_ref = torch.autograd.grad((ref * upstream).sum(), [x, *attn.parameters()])
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10)


def test_graph_is_fixed_seeded_per_layer_and_head_and_avoids_window_and_globals():
    a, b = BigBirdAttention(config(), layer=2, seed=7), BigBirdAttention(config(), layer=2, seed=7)
    assert torch.equal(a.rand_blocks, b.rand_blocks)  # reproducible from (seed, layer)
    assert not torch.equal(a.rand_blocks, BigBirdAttention(config(), layer=3, seed=7).rand_blocks)
    assert not torch.equal(a.rand_blocks, BigBirdAttention(config(), layer=2, seed=8).rand_blocks)
    assert not torch.equal(a.rand_blocks[0], a.rand_blocks[1])  # one draw per head
    heads, num_blocks, r = a.rand_blocks.shape
    assert (heads, num_blocks, r) == (3, 16, 3)
    for h in range(heads):
        for i in range(1, num_blocks - 1):
            row = a.rand_blocks[h, i].tolist()
            assert len(set(row)) == r
            assert all(0 < j < num_blocks - 1 and abs(j - i) > 1 for j in row)


def test_real_token_output_does_not_change_with_extra_padding():
    torch.manual_seed(1)
    attn = BigBirdAttention(config(), layer=0, seed=0).eval()
    lengths = torch.tensor([30, 17, 9])
    x = torch.randn(3, 64, 24)
    outs = []
    for padded in (30, 41, 64):  # 8 blocks, 11 blocks, and the full grid with its last global block
        mask = torch.arange(padded) < lengths[:, None]
        outs.append(attn(x[:, :padded], mask)[:, :30])
    real = (torch.arange(30) < lengths[:, None])[..., None]
    for out in outs[1:]:
        torch.testing.assert_close(out * real, outs[0] * real, rtol=1e-5, atol=1e-6)


def test_too_short_for_the_pattern_is_dense_attention():
    cfg = config(max_len=31)  # 32 positions = 8 blocks <= 2 + WINDOW + 3
    attn = BigBirdAttention(cfg)
    assert attn.dense and attn.num_blocks == 2 + WINDOW + cfg.num_random_blocks
    dense = DenseAttention(cfg)
    dense.load_state_dict(attn.state_dict())
    x, mask = torch.randn(2, 32, 24), torch.arange(32) < torch.tensor([[32], [20]])
    torch.testing.assert_close(attn(x, mask), dense(x, mask))


def test_sequence_of_padding_gives_zeros_not_nan():
    attn = BigBirdAttention(config())
    x = torch.randn(2, 40, 24, requires_grad=True)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, :25] = True
    out = attn(x, mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_attention_dropout_in_training_only():
    attn = BigBirdAttention(config(attn_dropout=0.5))
    x, mask = torch.randn(2, 64, 24), torch.ones(2, 64, dtype=torch.bool)
    assert not torch.allclose(attn(x, mask), attn(x, mask))
    attn.eval()
    assert torch.equal(attn(x, mask), attn(x, mask))


def test_longer_than_max_len_fails_clearly():
    with pytest.raises(ValueError, match="exceeds"):
        BigBirdAttention(config())(torch.randn(1, 65, 24), torch.ones(1, 65, dtype=torch.bool))


@pytest.mark.parametrize("max_len", [128, 200, 300])
def test_lengths_too_short_for_the_pattern_build_and_run_dense(max_len):
    """3-8 blocks: too few for 3 random blocks outside the window, so the layer is dense (no graph)."""
    from models import build_model

    cfg = ModelConfig(vocab_size=20, num_classes=2, max_len=max_len, num_layers=1, emb_dim=32, qkv_dim=32,
                      mlp_dim=32, num_heads=4)
    torch.manual_seed(0)
    sparse = build_model("bigbird", cfg, "ln").eval()
    torch.manual_seed(0)
    dense = build_model("transformer", cfg, "ln").eval()
    ids, mask = torch.randint(1, 20, (2, max_len)), torch.ones(2, max_len, dtype=torch.bool)
    torch.testing.assert_close(sparse(ids, mask), dense(ids, mask))
