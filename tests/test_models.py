"""All three encoders × every normalizer: gradients reach every parameter, padding does not change real
tokens, the Retrieval dual encoder's heads, and every task's configs build and run every encoder."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from lra_dtn.config import ModelConfig, Preset
from lra_dtn.norms import NORMS
from models import MODELS, build_model
from lra_dtn.app.specs import make_spec
from models.bigbird import BigBirdAttention
from models.blocks import pool
from models.reformer import ReformerAttention
from tasks import TASKS

ENCODERS = MODELS.names()
# DTN's positional-prior projection keeps the authors' bias, which cancels in the softmax over source
# tokens, so its gradient is exactly zero (shared/specs/dtn.md step 3; lra_dtn/dtn/module.py).
ZERO_GRADIENT = ("pos_proj.bias",)


def small_config(**kw) -> ModelConfig:
    """39 tokens + CLS: BigBird with block 4 has 10 canonical blocks (sparse path), Reformer buckets of 4."""
    base = dict(vocab_size=13, num_classes=3, max_len=39, num_layers=2, emb_dim=24, qkv_dim=24, mlp_dim=32,
                num_heads=3, dropout=0.0, attn_dropout=0.0, pos_emb="learned", block_size=4)
    return ModelConfig(**{**base, **kw})


def batch(lengths: list[int], width: int, vocab: int = 13) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.arange(width) < torch.tensor(lengths)[:, None]
    return torch.randint(1, vocab, (len(lengths), width)) * mask, mask


def test_each_attention_module_registers_one_encoder():
    """models/<name>.py registers the encoder <name>: one file per attention, the file named as the choice
    (besides the shared parts and the official quirks' switch)."""
    files = sorted(p.stem for p in (Path(__file__).parents[1] / "models").glob("*.py")
                   if p.stem not in ("__init__", "blocks", "quirks"))
    assert sorted(MODELS.get(name).__module__ for name in MODELS.names()) == [f"models.{stem}" for stem in files]
    assert sorted(MODELS.names()) == files


@pytest.mark.parametrize("norm", NORMS.names())
@pytest.mark.parametrize("model_name", ENCODERS)
def test_every_parameter_receives_a_gradient(model_name, norm):
    torch.manual_seed(0)
    model = build_model(model_name, small_config(), norm, seed=1).train()
    ids, mask = batch([39, 26, 8], 39)
    torch.nn.functional.cross_entropy(model(ids, mask), torch.tensor([0, 1, 2])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient: {missing}"
    zero = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0 and not n.endswith(ZERO_GRADIENT)]
    assert not zero, f"gradient identically zero: {zero}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("norm", NORMS.names())
@pytest.mark.parametrize("model_name", ENCODERS)
def test_real_tokens_do_not_change_with_extra_padding(model_name, norm):
    """Whatever the batch's width and whatever token ids sit in the padding (Reformer: LSH is exact
    only because every sequence is padded to one length with zero vectors inside the attention)."""
    torch.manual_seed(0)
    model = build_model(model_name, small_config(), norm, seed=1).eval()
    tokens = []
    model.encoder.final_norm.register_forward_hook(lambda module, args, out: tokens.append(out))
    lengths = [21, 13, 5]
    ids, mask = batch(lengths, 39)
    garbage = torch.randint(1, 13, ids.shape) * ~mask
    for width in (21, 30, 39):  # 6, 8 and all 10 BigBird blocks (the last one global)
        model(ids[:, :width], mask[:, :width])
    model(ids + garbage, mask)
    real = torch.arange(22) < torch.tensor(lengths)[:, None] + 1  # + CLS
    for out in tokens[1:]:
        torch.testing.assert_close(out[:, :22][real], tokens[0][real], rtol=1e-4, atol=1e-5)


def test_mean_pooling_after_a_zero_token_mean_norm_is_refused():
    """InstanceNorm's output averages to its bias over the tokens: MEAN pooling would make a classifier
    that ignores its input. Refused by the encoder and when a run is planned (before any training)."""
    from lra_dtn.app.specs import make_spec

    norm = NORMS.get("in")(24, 3)
    torch.nn.init.normal_(norm.bias)
    x, mask = torch.randn(3, 39, 24), batch([21, 13, 5], 39)[1]
    pooled = pool(norm(x, mask), mask, "mean")  # what the classifier would see, for any x
    torch.testing.assert_close(pooled, norm.bias.detach().expand_as(pooled), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="pooling=cls"):
        build_model("transformer", small_config(pooling="mean"), "in")
    with pytest.raises(ValueError, match="pooling=cls"):
        make_spec("pathfinder", "transformer", "in", "smoke")
    assert make_spec("pathfinder", "transformer", "in", "smoke", settings=["model.pooling=cls"]).norm == "in"


@pytest.mark.parametrize("dual_head, width", [("concat", 2), ("nli", 4)])
@pytest.mark.parametrize("model_name", ENCODERS)
def test_retrieval_dual_encoder_heads(model_name, dual_head, width):
    cfg = small_config(dual_head=dual_head, num_classes=2)
    model = build_model(model_name, cfg, "ln", dual=True)
    assert model.head[0].in_features == width * cfg.emb_dim
    assert [m.out_features for m in model.head if isinstance(m, torch.nn.Linear)] == [32, 16, 2]
    (ids, mask), (ids2, mask2) = batch([39, 12], 39), batch([20, 7], 20)
    model.eval()
    logits = model(ids, mask, ids2, mask2)
    assert logits.shape == (2, 2)
    u, v = model.encoder(ids, mask), model.encoder(ids2, mask2)  # one encoder serves both towers
    features = [u, v] if dual_head == "concat" else [u, v, u * v, u - v]
    torch.testing.assert_close(logits, model.head(torch.cat(features, dim=-1)))


@pytest.mark.parametrize("model_name", ENCODERS)
@pytest.mark.parametrize("task_name", TASKS.names())
def test_every_task_config_runs_every_encoder(task_name, model_name):
    """The official config builds; the smoke config (same code paths, smaller) trains a step."""
    task = TASKS.get(task_name)()
    official = task.spec(Preset.official, model_name)[0]
    build_model(model_name, official, "ln", dual=task.dual)
    torch.manual_seed(0)
    cfg = task.spec(Preset.smoke, model_name)[0]
    model = build_model(model_name, cfg, "ln", dual=task.dual).train()
    length = min(cfg.max_len, 200)
    ids, mask = batch([length, length // 2], length, cfg.vocab_size)
    inputs = (ids, mask, ids.flip(0), mask.flip(0)) if task.dual else (ids, mask)
    logits = model(*inputs)
    assert logits.shape == (2, cfg.num_classes) and not torch.equal(logits[0], logits[1])  # depends on the input
    logits.sum().backward()
    embedding = model.encoder.embed.tokens.weight.grad
    assert torch.isfinite(embedding).all() and embedding[ids[0, 0]].abs().sum() > 0  # the input's tokens learn


@pytest.mark.parametrize("preset", [Preset.cpu, Preset.smoke])
@pytest.mark.parametrize("task_name", TASKS.names())
def test_small_presets_run_bigbird_and_reformer_sparse(task_name, preset):
    """BigBird's block scales with the preset's length, so it never falls back to dense attention (<= 8
    blocks); the Reformer keeps more than the 2 buckets with which LSH attention is full attention."""
    task = TASKS.get(task_name)()
    bigbird = BigBirdAttention(task.spec(preset, "bigbird")[0])
    assert not bigbird.dense and 12 <= bigbird.num_blocks
    reformer = ReformerAttention(task.spec(preset, "reformer")[0])
    assert reformer.canonical_len // reformer.bucket_size >= 10


def test_listops_cpu_bigbird_has_13_blocks_of_8_and_reformer_10_buckets_of_11():
    cfg = TASKS.get("listops")().spec(Preset.cpu, "bigbird")[0]
    assert (cfg.encoder_length, cfg.block_size, BigBirdAttention(cfg).num_blocks) == (101, 8, 13)
    reformer = ReformerAttention(TASKS.get("listops")().spec(Preset.cpu, "reformer")[0])
    assert (reformer.bucket_size, reformer.canonical_len) == (11, 110)
    assert TASKS.get("image")().spec(Preset.cpu, "bigbird")[0].block_size == 64  # 1,025 tokens: the official 64


@pytest.mark.parametrize("task_name", TASKS.names())
def test_official_preset_has_no_attention_dropout_where_the_official_code_had_none(task_name):
    """BigBird's sparse path and the Reformer never apply attention dropout officially; the Transformer
    keeps its config's. Trained with the official preset, their attentions are deterministic."""
    config_file = TASKS.get(task_name)().spec(Preset.official, "transformer")[0].attn_dropout
    runs = {model: make_spec(task_name, model, "ln", "official").model for model in ENCODERS}
    assert config_file > 0 and runs["transformer"].attn_dropout == config_file
    assert runs["bigbird"].attn_dropout == 0 == runs["reformer"].attn_dropout
    assert make_spec(task_name, "bigbird", "ln", "official").variant == ""  # the preset itself
    if task_name == "listops":  # 2,001 tokens of width 512 in 32 blocks, and 10 buckets of 201
        torch.manual_seed(0)
        x, mask = torch.randn(1, 2001, 512), torch.ones(1, 2001, dtype=torch.bool)
        bigbird = BigBirdAttention(runs["bigbird"]).train()
        assert not bigbird.dense and torch.equal(bigbird(x, mask), bigbird(x, mask))
        reformer = ReformerAttention(dataclasses.replace(runs["reformer"], official_quirks=True)).train()
        assert torch.equal(reformer(x, mask), reformer(x, mask))  # fixed rotations, no dropout


def test_head_layers_take_flax_dense_init():
    """lecun_normal kernels (truncated normal, std 1/sqrt(fan_in)) and zero biases, as Flax ``Dense``."""
    torch.manual_seed(0)
    cfg = small_config(emb_dim=256, mlp_dim=512)
    head = build_model("transformer", cfg, "ln").head
    linears = [m for m in head if isinstance(m, torch.nn.Linear)]
    for layer in linears:
        bound = 2 / math.sqrt(layer.in_features) / 0.87962566103423978
        assert layer.weight.abs().max() <= bound and torch.count_nonzero(layer.bias) == 0
    assert linears[0].weight.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.02)  # 131k draws
