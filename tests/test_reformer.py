"""Reformer LSH attention: exact against a dense reference where LSH degenerates to full attention,
the corrected and the faithful quirks, seeded evaluation."""
from __future__ import annotations

import math

import pytest
import torch

from lra_dtn.config import ModelConfig
from models.reformer import ReformerAttention, SharedQKProjection


def config(**kw) -> ModelConfig:
    base = dict(vocab_size=11, num_classes=3, max_len=39, num_layers=1, emb_dim=24, qkv_dim=24, mlp_dim=16,
                num_heads=3, attn_dropout=0.0)
    return ModelConfig(**{**base, **kw})


def two_bucket_reference(attn: ReformerAttention, x: torch.Tensor, mask: torch.Tensor, faithful: bool) -> torch.Tensor:
    """With 2 buckets every chunk sees itself and the other one, so LSH attention is full attention
    with the package's rules: keys are unit-normalised, a token attends to itself only when nothing
    else is available (logit -5e4), and (corrected mode) padding is masked for keys and queries.
    Official quirks: the zero positions appended up to the canonical length are keys like any other."""
    length = x.shape[1]
    if faithful:
        x = torch.nn.functional.pad(x, (0, 0, 0, attn.canonical_len - length))
    qk, v = attn.proj.split(x)
    d = qk.shape[-1]
    logits = qk @ torch.nn.functional.normalize(qk, dim=-1).transpose(-1, -2)
    logits = logits * (math.sqrt(d) if faithful else 1 / math.sqrt(d))
    if not faithful:
        pair = mask[:, None, :, None] & mask[:, None, None, :]
        logits = logits.masked_fill(~pair, -torch.finfo(logits.dtype).max)
    eye = torch.eye(x.shape[1], dtype=torch.bool)
    logits = logits.masked_fill(eye, -5e4)
    return attn.proj.merge(torch.softmax(logits, dim=-1) @ v)[:, :length]


@pytest.mark.parametrize("faithful", [False, True])
def test_equals_full_attention_when_there_are_two_buckets(faithful):
    torch.manual_seed(0)
    attn = ReformerAttention(config(n_buckets=2, official_quirks=faithful)).double().eval()
    # ceil((39 + CLS) / 2): 40 tokens fill the two buckets exactly; official quirk: 40 + 10 zero positions
    # (chunk_len 10) make buckets of 25.
    assert attn.bucket_size == (25 if faithful else 20)
    x = torch.randn(2, 40, 24, dtype=torch.double)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 25:] = False
    out, ref = attn(x, mask), two_bucket_reference(attn, x, mask, faithful)
    real = mask[..., None]
    torch.testing.assert_close(out * real, ref * real, rtol=1e-9, atol=1e-9)


def test_corrected_mode_ignores_padding_and_faithful_mode_does_not():
    torch.manual_seed(0)
    x = torch.randn(1, 40, 24, dtype=torch.double)
    mask = torch.arange(40) < 25
    noisy = x.clone()
    noisy[:, 25:] = torch.randn(1, 15, 24, dtype=torch.double)  # other padding values
    for faithful in (False, True):
        attn = ReformerAttention(config(n_buckets=2, official_quirks=faithful)).double().eval()
        same = torch.allclose(attn(x, mask[None])[:, :25], attn(noisy, mask[None])[:, :25])
        assert same != faithful


def test_bucket_size_is_official_ten_buckets_over_max_len_and_any_length_works():
    attn = ReformerAttention(config(max_len=4000, n_buckets=10))
    assert attn.bucket_size == 401  # LRA: 10 chunks over the padded max length (+1 CLS)
    short = ReformerAttention(config())  # 40 positions -> buckets of 4
    for length in (1, 7, 33, 40):
        x = torch.randn(2, length, 24)
        assert short(x, torch.ones(2, length, dtype=torch.bool)).shape == x.shape


def test_evaluation_is_seeded_and_leaves_the_global_generator_alone():
    attn = ReformerAttention(config(), layer=1, seed=4).eval()
    x, mask = torch.randn(2, 40, 24), torch.ones(2, 40, dtype=torch.bool)
    torch.manual_seed(123)
    first = attn(x, mask)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)  # the forward consumed nothing from the global generator
    torch.manual_seed(999)
    assert torch.equal(attn(x, mask), first)
    other_layer = ReformerAttention(config(), layer=2, seed=4).eval()
    other_layer.load_state_dict(attn.state_dict())
    assert not torch.allclose(other_layer(x, mask), first)  # the hashing seed depends on the layer


def test_training_draws_fresh_rotations_unless_faithful():
    torch.manual_seed(0)
    x, mask = torch.randn(2, 40, 24), torch.ones(2, 40, dtype=torch.bool)
    attn = ReformerAttention(config()).train()
    assert not torch.allclose(attn(x, mask), attn(x, mask))
    faithful = ReformerAttention(config(official_quirks=True)).train()
    assert torch.equal(faithful(x, mask), faithful(x, mask))  # the official fixed rotations


def test_seeded_rotations_leave_attention_dropout_random():
    attn = ReformerAttention(config(official_quirks=True, attn_dropout=0.5)).train()
    x, mask = torch.randn(2, 40, 24), torch.ones(2, 40, dtype=torch.bool)
    assert not torch.allclose(attn(x, mask), attn(x, mask))


def test_shared_qk_has_no_key_projection():
    proj = SharedQKProjection(config())
    assert not hasattr(proj, "to_k")
    assert {n for n, _ in proj.named_parameters()} == {"to_q.weight", "to_v.weight", "to_out.weight"}


def test_odd_bucket_count_is_rejected():
    with pytest.raises(ValueError, match="even"):
        ReformerAttention(config(n_buckets=5))
