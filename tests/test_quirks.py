"""``model.official_quirks``: each official bug or accident, switched on, reproduces the official code
on a small case (numbers from the official rules, spec §6, §7.3, §7.4); off, nothing changes."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lra_dtn.app.specs import make_spec
from lra_dtn.config import ModelConfig
from models import build_model
from models.bigbird import BigBirdAttention, random_block_candidates
from models.blocks import Embedding, Encoder
from models.quirks import OFFICIAL, Quirks
from models.reformer import ReformerAttention
from models.transformer import DenseAttention
from tasks import TASKS


def config(**kw) -> ModelConfig:
    """63 tokens + CLS = 64 positions: 16 BigBird blocks of 4, a multiple (the whole-padding-block case)."""
    base = dict(vocab_size=11, num_classes=3, max_len=63, num_layers=1, emb_dim=24, qkv_dim=24, mlp_dim=16,
                num_heads=3, block_size=4, dropout=0.0, attn_dropout=0.0)
    return ModelConfig(**{**base, **kw})


def test_one_switch_turns_every_quirk_on_and_the_default_has_none():
    assert Quirks.of(config()) == Quirks() and not any(dataclasses.astuple(Quirks.of(config())))
    assert Quirks.of(config(official_quirks=True)) == OFFICIAL and all(dataclasses.astuple(OFFICIAL))
    spec = make_spec("pathfinder", "transformer", "ln", "smoke", settings=["model.official_quirks=true"])
    assert spec.model.official_quirks and spec.variant  # a run of its own
    pathfinder = TASKS.get("pathfinder")()
    assert "official quirks" in pathfinder.describe(spec.data, spec.model)  # the table says so
    assert "pixel 0 a real token" in pathfinder.describe(spec.data, config())


# ---------------------------------------------------------------------------------------------------
# Every encoder: padding to max_len, the inputs > 0 mask, the CLS mask, MEAN over padding


def test_embedding_pads_to_max_len_masks_zero_ids_and_copies_token_0s_mask_to_cls():
    ids = torch.tensor([[0, 5, 3, 0, 2], [4, 1, 0, 0, 0]])  # row 0 image-like: pixel 0 is real data
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    official = Embedding(config(max_len=7, official_quirks=True))
    x, m = official(ids, mask)
    assert x.shape == (2, 8, 24)  # max_len + CLS, whatever the batch width
    assert m.tolist() == [[False, False, True, True, False, True, False, False],  # CLS copies pixel 0's mask
                          [True, True, True, False, False, False, False, False]]
    x, m = Embedding(config(max_len=7))(ids, mask)
    assert x.shape == (2, 6, 24)
    assert m.tolist() == [[True] * 6, [True, True, True, False, False, False]]


def test_mean_pooling_counts_the_padding_up_to_max_len():
    torch.manual_seed(0)
    cfg = config(max_len=20, pooling="mean", official_quirks=True)
    encoder = Encoder(cfg, DenseAttention, "ln").eval()
    seen = []
    encoder.final_norm.register_forward_hook(lambda module, args, out: seen.append((out, args[1])))
    ids = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 2, 0, 0, 0, 0]])
    pooled = encoder(ids, ids > 0)
    tokens, mask = seen[0]
    assert tokens.shape == (2, 20, 24) and mask.sum(1).tolist() == [6, 2]
    torch.testing.assert_close(pooled, tokens.sum(1) / 20)  # official jnp.mean over all 20 positions
    masked_mean = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert not torch.allclose(pooled, masked_mean, atol=1e-3)


def test_dense_attention_masks_queries_as_flax_make_padding_mask():
    """Official: bias -1e10 wherever the query or the key is padding; in float32 a padded query's logits
    all round to -1e10, so its output is the mean of every value."""
    torch.manual_seed(0)
    attn = DenseAttention(config(official_quirks=True)).eval()
    x = torch.randn(2, 10, 24)
    mask = torch.tensor([[True] * 10, [True, False, True, True, False, True, True, False, False, False]])
    q, k, v = attn.proj.split(x)
    both = mask[:, None, :, None] & mask[:, None, None, :]
    bias = torch.zeros(both.shape).masked_fill(~both, -1e10)
    official = attn.proj.merge(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias, -1) @ v)
    torch.testing.assert_close(attn(x, mask), official, rtol=1e-5, atol=1e-6)
    default = DenseAttention(config()).eval()
    default.load_state_dict(attn.state_dict())
    real = mask[..., None]
    torch.testing.assert_close(default(x, mask) * real, official * real, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(default(x, mask)[1, 1], official[1, 1], atol=1e-3)


@pytest.mark.parametrize("model_name", ["transformer", "bigbird", "reformer"])
def test_with_quirks_logits_do_not_depend_on_the_batch_width(model_name):
    """Every batch is padded to max_len, as the official pipelines do, so even the mask-ignoring
    Reformer and the padding-counting MEAN give the same logits at any width; a training step runs."""
    torch.manual_seed(0)
    model = build_model(model_name, config(max_len=39, official_quirks=True, pooling="mean"), "ln", seed=1)
    ids = torch.randint(1, 11, (3, 39)) * (torch.arange(39) < torch.tensor([[21], [13], [5]]))
    model.eval()
    logits = model(ids, ids > 0)
    torch.testing.assert_close(model(ids[:, :21], ids[:, :21] > 0), logits, rtol=1e-5, atol=1e-6)
    model.train()
    torch.nn.functional.cross_entropy(model(ids, ids > 0), torch.tensor([0, 1, 2])).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------------
# BigBird


def test_bigbird_draws_random_blocks_below_1024_over_block_only():
    """ListOps: 2000 tokens + CLS, padded by 47 to 2048 = 32 blocks of 64. last_idx = 1024: every random
    block is below 16, and the rows N-3 and N-2 draw among 1..11 and 1..12 (their cases in the official
    code assume that block 15 is the last)."""
    cfg = config(max_len=2000, block_size=64, emb_dim=8, qkv_dim=8, num_heads=4)
    quirky = BigBirdAttention(dataclasses.replace(cfg, official_quirks=True))
    default = BigBirdAttention(cfg)
    assert (quirky.num_blocks, default.num_blocks) == (32, 32)
    rows = quirky.rand_blocks[:, 1:-1]
    assert rows.min() >= 1 and rows.max() < 16
    assert quirky.rand_blocks[:, 29].max() <= 11 and quirky.rand_blocks[:, 30].max() <= 12
    assert default.rand_blocks[:, 1:-1].max() >= 16  # the corrected graph reaches the whole sequence
    for i in range(1, 17):
        assert all(abs(j - i) > 1 for j in quirky.rand_blocks[:, i].flatten().tolist())


@pytest.mark.parametrize("row, num_blocks, below, expected", [
    # get_block_rand_mask(last_idx=1024) with 32 blocks of 64 (last = 15): the rules row by row.
    (1, 32, 16, range(3, 16)), (2, 32, 16, range(4, 16)),
    (10, 32, 16, [*range(1, 9), *range(12, 16)]), (14, 32, 16, range(1, 13)), (15, 32, 16, range(1, 14)),
    (16, 32, 16, range(1, 15)), (20, 32, 16, range(1, 16)), (29, 32, 16, range(1, 12)), (30, 32, 16, range(1, 13)),
    # uncapped (corrected, or at most 1024 positions): every non-global block outside the window.
    (1, 16, None, range(3, 15)), (7, 16, None, [*range(1, 6), *range(9, 15)]), (13, 16, None, range(1, 12)),
    (14, 16, None, range(1, 13)), (13, 16, 16, range(1, 12)), (14, 16, 16, range(1, 13)),
])
def test_random_block_candidates_follow_the_official_rows(row, num_blocks, below, expected):
    assert random_block_candidates(row, num_blocks, below) == list(expected)


def test_bigbird_appends_a_whole_block_of_real_zero_keys_and_zeroes_masked_queries():
    """64 positions (a multiple of 4): the official grid has 17 blocks, the 17th of zero vectors that
    count as keys (logit 0, value 0). Global block 0 sees every key in both modes, so its official
    output is the corrected one scaled by Z / (Z + 4), Z = sum of exp(logits) over its valid keys."""
    torch.manual_seed(0)
    cfg = config(num_heads=1, emb_dim=8, qkv_dim=8)
    quirky = BigBirdAttention(dataclasses.replace(cfg, official_quirks=True), layer=0, seed=0).double().eval()
    default = BigBirdAttention(cfg, layer=0, seed=0).double().eval()
    default.load_state_dict(quirky.state_dict())
    assert (quirky.num_blocks, default.num_blocks) == (17, 16)
    x = torch.randn(2, 64, 8, dtype=torch.double)
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[1, 40:] = False
    q, k, _ = default.proj.split(x)
    logits = (q[:, 0, :4] @ k[:, 0].transpose(-1, -2)) / math.sqrt(8)
    z = (logits.exp() * mask[:, None, :]).sum(-1, keepdim=True)  # (B, 4, 1)
    out, ref = quirky(x, mask), default(x, mask)
    torch.testing.assert_close(out[:, :4], ref[:, :4] * z / (z + 4), rtol=1e-10, atol=1e-12)
    assert torch.equal(out[1, 40:], torch.zeros_like(out[1, 40:]))  # masked queries: * seq_m_pad
    assert ref[1, 40:].abs().sum() > 0


def test_bigbird_graph_is_seeded_by_the_layer_only():
    def graph(layer: int, seed: int, quirks: bool) -> torch.Tensor:
        return BigBirdAttention(config(official_quirks=quirks), layer=layer, seed=seed).rand_blocks

    assert torch.equal(graph(2, 7, True), graph(2, 8, True))
    assert not torch.equal(graph(2, 7, True), graph(3, 7, True))
    assert not torch.equal(graph(2, 7, False), graph(2, 8, False))


# ---------------------------------------------------------------------------------------------------
# Reformer (the sqrt(d) logits and the ignored mask: test_reformer.py, against a dense reference)


def test_reformer_qkv_width_is_emb_dim_and_there_is_no_output_projection():
    cfg = config(emb_dim=24, qkv_dim=12, num_heads=3)
    def shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in ReformerAttention(c).named_parameters()}

    assert shapes(dataclasses.replace(cfg, official_quirks=True)) == {"proj.to_q.weight": (24, 24),
                                                                      "proj.to_v.weight": (24, 24)}
    assert shapes(cfg) == {"proj.to_q.weight": (12, 24), "proj.to_v.weight": (12, 24), "proj.to_out.weight": (24, 12)}


def test_reformer_rotations_are_fixed_in_every_layer_seed_and_step():
    torch.manual_seed(0)
    x, mask = torch.randn(2, 64, 24), torch.ones(2, 64, dtype=torch.bool)
    a = ReformerAttention(config(official_quirks=True), layer=0, seed=0).train()
    b = ReformerAttention(config(official_quirks=True), layer=3, seed=5).train()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x, mask), a(x, mask)) and torch.equal(a(x, mask), b(x, mask))
    c = ReformerAttention(config(), layer=3, seed=5).eval()
    d = ReformerAttention(config(), layer=0, seed=0).eval()
    d.load_state_dict(c.state_dict())
    assert not torch.allclose(c(x, mask), d(x, mask))  # corrected: seeded per (seed, layer)


def test_reformer_pads_with_one_to_ten_zero_positions_as_chunk_len_10():
    """Retrieval: 4000 bytes, no CLS; officially padded by 10 to 4010, ten buckets of 401."""
    retrieval = config(max_len=4000, pooling="first", emb_dim=8, qkv_dim=8, num_heads=2)
    quirky = ReformerAttention(dataclasses.replace(retrieval, official_quirks=True))
    assert (quirky.canonical_len, quirky.bucket_size) == (4010, 401)
    default = ReformerAttention(retrieval)
    assert (default.canonical_len, default.bucket_size) == (4000, 400)
    listops = ReformerAttention(config(max_len=2000, emb_dim=8, qkv_dim=8, num_heads=2, official_quirks=True))
    assert (listops.canonical_len, listops.bucket_size) == (2010, 201)  # 2001 + 9
