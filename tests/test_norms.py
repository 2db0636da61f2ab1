"""Every registered normalizer: the baselines' numbers, padding invariance, and the registry's errors.

DTN's own numbers are in ``test_dtn.py``; every norm inside every encoder is in ``test_models.py``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lra_dtn import dtn  # noqa: F401  (registers dtn and dtn_var beside the norms of lra_dtn.norms)
from lra_dtn.norms import NORMS, Norm, build_norm, masked_token_mean
from lra_dtn.registry import Registry

DIM, HEADS = 16, 4


def tokens(batch: int = 3, length: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, DIM, generator=g) * 3 + 1


def randomised(norm: Norm, seed: int = 1) -> Norm:
    """Random affine parameters, so a test also checks that they are applied per channel."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in norm.named_parameters():
            if name in ("weight", "bias"):
                p.copy_(torch.randn(p.shape, generator=g))
    return norm


def subclasses(cls: type) -> set[type]:
    return {sub for direct in cls.__subclasses__() for sub in {direct} | subclasses(direct)}


def test_every_normalizer_class_is_registered_once():
    """Each concrete Norm of the library modules is one registry entry, and every entry is a Norm."""
    library = (["lra_dtn", "norms"], ["lra_dtn", "dtn"])  # lra_dtn.dtn is a package
    ours = {cls for cls in subclasses(Norm) if cls.__module__.split(".")[:2] in library}
    entries = [NORMS.get(name) for name in NORMS.names()]
    assert all(issubclass(cls, Norm) for cls in entries) and len(set(entries)) == len(entries)
    assert ours <= set(entries) and NORMS.get("dtn") in ours and NORMS.get("ln") in ours


def test_layer_norm_standardises_each_token_over_channels():
    norm, x = randomised(build_norm("ln", DIM, HEADS)), tokens()
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-6) * norm.weight + norm.bias  # Flax eps 1e-6
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)


def test_rms_norm_rescales_by_the_root_mean_square():
    norm, x = randomised(build_norm("rms", DIM, HEADS)), tokens()
    expected = x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)
    assert not hasattr(norm, "bias")


def test_scale_norm_gives_every_token_the_norm_sqrt_c_at_init():
    norm, x = build_norm("scale", DIM, HEADS), tokens()
    assert norm.scale.item() == pytest.approx(DIM**0.5)
    torch.testing.assert_close(norm(x).norm(dim=-1), torch.full(x.shape[:2], DIM**0.5), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        norm.scale.fill_(2.0)
    torch.testing.assert_close(norm(x), 2 * x / x.norm(dim=-1, keepdim=True))


def test_instance_norm_uses_the_real_tokens_of_each_sequence_only():
    norm, x = randomised(build_norm("in", DIM, HEADS)), tokens(length=12)
    lengths = [12, 7, 1]
    mask = torch.arange(12)[None] < torch.tensor(lengths)[:, None]
    y = norm(x, mask)
    for b, n in enumerate(lengths):
        real = x[b, :n]
        mean, var = real.mean(0), real.var(0, unbiased=False)
        expected = (real - mean) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias
        torch.testing.assert_close(y[b, :n], expected, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(y).all()
    # one real token: zero variance, so the output is the bias alone
    torch.testing.assert_close(y[2, 0], norm.bias.detach(), rtol=1e-5, atol=1e-5)


def test_masked_token_mean_ignores_padding_and_survives_an_empty_sequence():
    x = torch.arange(12.0).view(2, 3, 2)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    mean = masked_token_mean(x, mask)
    torch.testing.assert_close(mean[0, 0], x[0, :2].mean(0))
    assert torch.equal(mean[1, 0], torch.zeros(2))  # no real token: zero, not NaN
    torch.testing.assert_close(masked_token_mean(x, None), x.mean(1, keepdim=True))


@pytest.mark.parametrize("name", NORMS.names())
def test_padding_never_changes_real_tokens(name):
    """The same sequences with 15 more padded tokens of arbitrary (huge) content: real outputs and their
    gradients are unchanged, and every output is finite."""
    torch.manual_seed(0)
    norm = randomised(build_norm(name, DIM, HEADS))
    lengths = torch.tensor([20, 9, 1])
    x = tokens().requires_grad_()
    y = norm(x, torch.arange(20)[None] < lengths[:, None])
    grad = torch.randn_like(y) * (torch.arange(20)[None, :, None] < lengths[:, None, None])
    (y * grad).sum().backward()

    padded = torch.cat([x.detach(), 1e4 * torch.randn(3, 15, DIM)], dim=1).requires_grad_()
    y_padded = norm(padded, torch.arange(35)[None] < lengths[:, None])
    assert torch.isfinite(y_padded).all()
    (y_padded[:, :20] * grad).sum().backward()
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(y_padded[b, :n], y[b, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(padded.grad[b, :n], x.grad[b, :n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NORMS.names())
def test_every_norm_is_a_norm_with_the_shared_call(name):
    norm = build_norm(name, DIM, HEADS)
    assert isinstance(norm, Norm) and (norm.dim, norm.num_heads) == (DIM, HEADS)
    x = tokens(length=5).requires_grad_()
    y = norm(x)  # mask=None: every token real
    assert y.shape == x.shape and torch.isfinite(y).all()
    torch.testing.assert_close(y, norm(x, torch.ones(x.shape[:2], dtype=torch.bool)))  # None = all real
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_unknown_names_fail_with_the_list_of_registered_ones():
    with pytest.raises(KeyError) as error:
        build_norm("batchnorm", DIM, HEADS)
    message = str(error.value)
    assert "unknown norm 'batchnorm'" in message
    for name in NORMS.names():
        assert name in message


def test_registering_a_name_twice_is_refused():
    registry: Registry[type] = Registry("norm")
    registry.register("x")(int)
    with pytest.raises(ValueError, match="'x' is registered twice"):
        registry.register("x")(float)
    with pytest.raises(ValueError, match="registered twice"):
        NORMS.register("ln")(Norm)
    assert NORMS.get("ln").__name__ == "LayerNorm"
