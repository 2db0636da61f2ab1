"""DTN's 2-D positional prior against the authors' module (recorded fixtures) and the dense float64
reference written from their formula (``lra_dtn.dtn.reference.grid_reference``), with padding and a
CLS token."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lra_dtn.app import plots
from lra_dtn.config import ModelConfig, Preset
from lra_dtn.dtn import DynamicTokenNorm, DynamicTokenVarNorm
from lra_dtn.dtn import grid as grid2d
from lra_dtn.dtn.grid import grid_dtn, grid_local_offsets, local_init
from lra_dtn.dtn.reference import dense_reference, grid_reference as reference
from lra_dtn.norms import LayerNorm, build_norm
from models import build_model
from tasks import TASKS
from test_dtn import LargestTensor

PARAMS = ("pos_proj.weight", "pos_proj.bias", "gate_mean", "gate_var", "weight", "bias")


def call(params: dict[str, torch.Tensor], x, mask, heads: int, grid: tuple[int, int], eps: float = 1e-5):
    return grid_dtn(x, mask, params["pos_proj.weight"], params["pos_proj.bias"], params.get("gate_mean"),
                    params["gate_var"], params["weight"], params["bias"], heads, grid, eps)


def random_params(channels: int, heads: int, kernel: tuple[float, float, float] | None, seed: int = 0,
                  only_var: bool = False) -> dict[str, torch.Tensor]:
    """Random gates and affine; ``kernel`` ``(a, b, c)`` on ``dx, dy, dx^2 + dy^2``, jittered 10% per
    head (``None``: the local init)."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.nn.Linear(3, heads)
    torch.manual_seed(seed)
    local_init(proj)
    params = {"pos_proj.weight": proj.weight.detach().clone(), "pos_proj.bias": torch.randn(heads, generator=g),
              "gate_var": torch.randn(heads, generator=g), "weight": 1 + 0.5 * torch.randn(channels, generator=g),
              "bias": torch.randn(channels, generator=g)}
    if not only_var:
        params["gate_mean"] = torch.randn(heads, generator=g)
    if kernel is not None:
        jitter = 1 + 0.1 * torch.randn(heads, 1, generator=g)
        params["pos_proj.weight"] = torch.tensor(kernel).expand(heads, 3) * jitter
    return params


def relative_error(y: torch.Tensor, ref: torch.Tensor, real: torch.Tensor) -> float:
    return ((y.double() - ref).abs()[real].max() / ref.abs()[real].max()).item()


KERNELS = {  # (a, b, c): logit a dx + b dy + c (dx^2 + dy^2)
    "init": None,
    "sharp": (0.3, -0.2, -40.0),
    "wide": (0.05, -0.02, -2e-3),
    "flat": (0.0, 0.0, 0.0),
    "shifted": (12.0, -8.0, -1.0),  # peak at (6, -4): at the edge of small grids
    "far-shifted": (400.0, 300.0, -20.0),  # peak at (10, 7.5), 1300 nats above d = 0: exact rows
    "linear": (2.0, -3.0, 0.0),
    "upward": (0.0, 0.0, 0.4),  # inverted: the farthest pixels dominate
    "upward-shifted": (-3.0, 1.0, 0.05),
}
GRIDS = ((1, 1), (1, 6), (4, 5), (7, 7))


def grid_masks(batch: int, tokens: int, prefix: int, seed: int) -> dict[str, torch.Tensor | None]:
    """Masks over ``prefix + grid`` tokens; the CLS prefix is always real, as the encoder makes it."""
    g = torch.Generator().manual_seed(seed)
    pixels = tokens - prefix
    scattered = torch.rand(batch, pixels, generator=g) < 0.3  # like mask_zero_tokens on a dark image
    one = torch.zeros(batch, pixels, dtype=torch.bool)
    one[torch.arange(batch), torch.randint(0, pixels, (batch,), generator=g)] = True
    cls = torch.ones(batch, prefix, dtype=torch.bool)
    return {"none": None, **{name: torch.cat([cls, m], dim=1) for name, m in (("scattered", scattered),
                                                                             ("one-pixel", one))}}


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_forward_matches_the_dense_reference(kernel: str) -> None:
    for seed, (grid, prefix) in enumerate((g, p) for g in GRIDS for p in (0, 1)):
        params = random_params(24, 4, KERNELS[kernel], seed)
        tokens = prefix + grid[0] * grid[1]
        x = torch.randn(3, tokens, 24, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3
        for name, mask in grid_masks(3, tokens, prefix, seed).items():
            y = call(params, x, mask, 4, grid)
            assert torch.isfinite(y).all(), (kernel, grid, name)
            real = torch.ones(3, tokens, dtype=torch.bool) if mask is None else mask
            ref = reference({k: v.double() for k, v in params.items()}, x.double(), mask, 4, grid, 1e-5)
            assert relative_error(y, ref, real) < 1e-5, (kernel, grid, prefix, name)


@pytest.mark.parametrize("kernel, only_var", [("init", False), ("shifted", False), ("wide", True),
                                              ("upward", False), ("far-shifted", False)])
def test_gradients_match_the_dense_reference(kernel: str, only_var: bool) -> None:
    """float32 gradients of x and of every parameter against the float64 reference, masked, with CLS."""
    grid, heads = (5, 6), 4
    params = random_params(16, heads, KERNELS[kernel], seed=3, only_var=only_var)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 31, 16, generator=g)
    mask = torch.cat([torch.ones(2, 1, dtype=torch.bool), torch.rand(2, 30, generator=g) < 0.4], dim=1)
    grad_y = torch.randn(2, 31, 16, generator=g) * mask[..., None]
    leaves32 = {k: v.clone().requires_grad_() for k, v in params.items()}
    x32 = x.clone().requires_grad_()
    call(leaves32, x32, mask, heads, grid).backward(grad_y)
    leaves64 = {k: v.double().requires_grad_() for k, v in params.items()}
    x64 = x.double().requires_grad_()
    reference(leaves64, x64, mask, heads, grid, 1e-5).backward(grad_y.double())
    assert (x32.grad.double() - x64.grad).abs().max() < 1e-5 * x64.grad.abs().max()
    assert (x32.grad[~mask] == 0).all()  # padded pixels influence nothing
    for name in params:
        ours, ref = leaves32[name].grad, leaves64[name].grad
        if name == "pos_proj.bias":  # cancels in the softmax: exactly zero here, rounding noise there
            assert (ours == 0).all() and ref.abs().max() < 1e-9
            continue
        # far-shifted: the true pos_proj gradient is ~1e-6, what is left of terms of size ~|d| that cancel
        assert (ours.double() - ref).abs().max() <= 2e-5 * ref.abs().max() + 1e-6, (kernel, name)


def test_gradcheck_float64_through_the_exact_rows(monkeypatch) -> None:
    calls = []
    real_exact = grid2d.exact_rows
    monkeypatch.setattr(grid2d, "exact_rows", lambda *a: calls.append(len(a[4][0])) or real_exact(*a))
    params = {k: v.double() for k, v in random_params(8, 2, (80.0, 0.0, -8.0), seed=1).items()}  # peak dx = 5
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1 + 20, 8, dtype=torch.float64, generator=g)
    mask = torch.cat([torch.ones(2, 1, dtype=torch.bool), torch.rand(2, 20, generator=g) < 0.5], dim=1)
    names = list(params)

    def f(x, *leaves):
        return call(dict(zip(names, leaves)), x, mask, 2, (4, 5))

    leaves = [params[k].clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(f, (x.requires_grad_(), *leaves), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)
    assert calls and all(n > 0 for n in calls)  # the exact rows were exercised


OFFICIAL = np.load(Path(__file__).with_name("fixtures") / "dtn2d_official.npz")
OFFICIAL_NAMES = {"mean_norm_weight": "gate_mean", "var_norm_weight": "gate_var", "weight": "weight",
                  "bias": "bias", "pos_proj.weight": "pos_proj.weight", "pos_proj.bias": "pos_proj.bias"}
OFFICIAL_CASES = {"s6_h4": (6, 4), "s5_h6": (5, 6), "s4_h9_var": (4, 9)}  # (grid side, heads), as recorded


@pytest.mark.parametrize("case", list(OFFICIAL_CASES))
def test_matches_the_authors_module(case: str) -> None:
    """The authors' module, run in float64 on a square grid without CLS or padding
    (``tests/fixtures/dtn2d_official.py`` recorded its output and gradients)."""
    side, heads = OFFICIAL_CASES[case]
    arrays = {k.split("/", 1)[1]: torch.from_numpy(OFFICIAL[k]) for k in OFFICIAL.files if k.startswith(case + "/")}
    params = {ours: arrays[theirs].clone().requires_grad_() for theirs, ours in OFFICIAL_NAMES.items()
              if theirs in arrays}
    x = arrays["x"].clone().requires_grad_()
    y = call(params, x, None, heads, (side, side))
    torch.testing.assert_close(y, arrays["y"], rtol=1e-10, atol=1e-10)
    (y * arrays["grad_y"]).sum().backward()
    torch.testing.assert_close(x.grad, arrays["grad_x"], rtol=1e-9, atol=1e-9)
    for theirs, ours in OFFICIAL_NAMES.items():
        if theirs in arrays and ours != "pos_proj.bias":  # theirs: rounding noise around zero
            torch.testing.assert_close(params[ours].grad, arrays[f"grad_{theirs}"], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", list(OFFICIAL_CASES))
def test_local_init_is_the_authors(case: str) -> None:
    """Rows ``0 ... K*K-1`` exactly as the authors' ``local_init``; the rest keep their std-0.02 draws."""
    side, heads = OFFICIAL_CASES[case]
    theirs = torch.from_numpy(OFFICIAL[f"{case}/init_weight"]).float()
    proj = torch.nn.Linear(3, heads)
    local_init(proj)
    local = math.isqrt(heads) ** 2
    assert torch.equal(proj.weight[:local], theirs[:local])
    for w in (proj.weight[local:], theirs[local:]):
        assert (w.abs() < 0.1).all()


def test_local_init_puts_head_h_at_its_own_offset() -> None:
    assert grid_local_offsets(4).tolist() == [[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]]
    assert grid_local_offsets(9)[:4].tolist() == [[-1, -1], [-1, 0], [-1, 1], [0, -1]]
    assert len(grid_local_offsets(8)) == 4  # K = 2: heads 4 ... 7 stay near-uniform
    proj = torch.nn.Linear(3, 9)
    local_init(proj)
    rows, cols = 9, 9
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    centre = (4, 4)  # output pixel (row, col); dx = col_out - col_src, dy = row_out - row_src
    dx, dy = (centre[1] - x).double(), (centre[0] - y).double()
    features = torch.stack([dx, dy, dx**2 + dy**2], dim=-1)
    for h, (kx, ky) in enumerate(grid_local_offsets(9).tolist()):
        window = torch.softmax(F.linear(features, proj.weight.double()[h : h + 1]).flatten(), 0)
        gaussian = torch.softmax((-((dx - kx) ** 2) - (dy - ky) ** 2).flatten(), 0)
        torch.testing.assert_close(window, gaussian, rtol=1e-6, atol=1e-7)
        source = int(window.argmax())  # the source pixel the head looks at most
        assert (centre[1] - source % cols, centre[0] - source // cols) == (kx, ky), h


def test_padding_and_cls() -> None:
    """Masked pixels are never sources: their content changes no real output and gets no gradient;
    the CLS output is LayerNorm of its own pre-scaled vector, whatever the pixels."""
    params = {k: v.requires_grad_() for k, v in random_params(16, 4, (0.4, -0.3, -0.05), seed=7).items()}
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 1 + 36, 16, generator=g, requires_grad=True)
    mask = torch.cat([torch.ones(2, 1, dtype=torch.bool), torch.rand(2, 36, generator=g) < 0.5], dim=1)
    grad_y = torch.randn(2, 37, 16, generator=g) * mask[..., None]
    y = call(params, x, mask, 4, (6, 6))
    (y * grad_y).sum().backward()
    garbage = torch.where(mask[..., None], x.detach(), 1e3 * torch.randn(2, 37, 16, generator=g)).requires_grad_()
    y2 = call(params, garbage, mask, 4, (6, 6))
    assert torch.isfinite(y2).all()
    torch.testing.assert_close(y2[mask], y[mask], rtol=1e-5, atol=1e-5)
    (y2 * grad_y).sum().backward()
    assert (garbage.grad[~mask] == 0).all()
    cls = x.detach()[:, 0].view(2, 4, 4)
    cls = (cls / torch.sqrt(cls.square().mean(-1, keepdim=True) + 1e-5)).reshape(2, 16)
    expected = (cls - cls.mean(-1, keepdim=True)) / torch.sqrt(cls.var(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(y[:, 0], expected * params["weight"] + params["bias"])
    other = torch.cat([x.detach()[:, :1], torch.randn(2, 36, 16, generator=g)], dim=1)
    torch.testing.assert_close(call(params, other, mask, 4, (6, 6))[:, 0], y[:, 0])


def test_no_nan_at_the_extremes() -> None:
    for kernel in [(0.0, 0.0, -1e4), (1e4, -1e4, -1e-3), (-5e3, 0.0, -20.0), (50.0, 50.0, 0.0), (0.0, 0.0, 5.0)]:
        params = {k: v.requires_grad_() for k, v in random_params(16, 4, kernel).items()}
        for grid in ((1, 1), (3, 7), (16, 16)):
            tokens = 1 + grid[0] * grid[1]
            x = torch.randn(3, tokens, 16, requires_grad=True)
            mask = torch.zeros(3, tokens, dtype=torch.bool)
            mask[:, 0] = True  # CLS
            mask[0, 1:] = True
            mask[1, -1] = True  # one real pixel; sequence 2 has none at all
            y = call(params, x, mask, 4, grid)
            y.sum().backward()
            assert torch.isfinite(y).all() and torch.isfinite(x.grad).all(), (kernel, grid)
            assert all(torch.isfinite(p.grad).all() for p in params.values()), (kernel, grid)


def test_bf16_autocast_computes_statistics_in_float32() -> None:
    params = random_params(32, 4, None)
    x = (torch.randn(2, 65, 32) * 0.5 + 20).bfloat16()  # large mean, small spread: E[x^2] - E[x]^2 cancels
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = call(params, x, None, 4, (8, 8))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), call(params, x.float(), None, 4, (8, 8)), rtol=2e-2, atol=2e-2)


def test_never_materialises_a_batch_head_token_token_tensor() -> None:
    B, rows, cols, C, H = 2, 32, 32, 16, 4
    params = {k: v.requires_grad_() for k, v in random_params(C, H, (0.0, 0.0, -1e-4)).items()}
    x = torch.randn(B, 1 + rows * cols, C, requires_grad=True)
    with LargestTensor() as probe:
        call(params, x, torch.rand(B, 1 + rows * cols) < 0.7, H, (rows, cols)).sum().backward()
    assert probe.largest <= B * (1 + rows * cols) * (2 * C + H), probe.largest  # the packed values


def test_a_grid_larger_than_the_sequence_is_refused() -> None:
    params = random_params(8, 2, None)
    with pytest.raises(ValueError, match="4x4 grid"):
        call(params, torch.randn(1, 15, 8), None, 2, (4, 4))


def test_the_module_takes_the_grid_and_the_2d_prior() -> None:
    norm = build_norm("dtn", 16, 4, grid=(4, 5))
    assert norm.prior == "2d" and norm.grid == (4, 5) and norm.pos_proj.in_features == 3
    assert build_norm("dtn", 16, 4).prior == "1d" and build_norm("dtn", 16, 4).pos_proj.in_features == 2
    assert isinstance(build_norm("ln", 16, 4, grid=(4, 5)), LayerNorm)  # norms without a prior ignore it
    assert torch.equal(norm.pos_proj.weight[:, 2], torch.tensor([-1.0] * 4))  # the 2-D local init
    var = DynamicTokenVarNorm(16, 4, grid=(4, 5))
    for module in (norm, var):
        with torch.no_grad():
            module.pos_proj.weight.copy_(torch.tensor(KERNELS["shifted"]).expand(4, 3) * 0.3)
            module.gate_var.normal_()
        x = torch.randn(2, 21, 16)
        mask = torch.cat([torch.ones(2, 1, dtype=torch.bool), torch.rand(2, 20) < 0.6], dim=1)
        assert relative_error(module(x, mask), dense_reference(module, x, mask), mask) < 1e-5
    with pytest.raises(ValueError, match="grid must be"):
        DynamicTokenNorm(16, 4, grid=(4, 0))


def test_the_encoder_hands_the_task_grid_to_every_norm_slot() -> None:
    cfg = ModelConfig(vocab_size=256, num_classes=2, max_len=16, num_layers=2, emb_dim=16, qkv_dim=16, mlp_dim=32,
                      num_heads=4, pooling="cls", grid=(4, 4))
    model = build_model("transformer", cfg, "dtn")
    norms = [m for m in model.modules() if isinstance(m, DynamicTokenNorm)]
    assert len(norms) == 5 and all(n.prior == "2d" and n.grid == (4, 4) for n in norms)
    ids = torch.randint(0, 256, (3, 16))
    assert torch.isfinite(model(ids, ids > 40)).all()  # CLS + 16 pixels, dark ones masked
    raster = build_model("transformer", replace(cfg, norm_prior="1d"), "dtn")
    assert all(m.prior == "1d" for m in raster.modules() if isinstance(m, DynamicTokenNorm))
    with pytest.raises(ValueError, match=r"rows \* cols = max_len 16"):
        replace(cfg, grid=(4, 5))
    with pytest.raises(ValueError, match="norm_prior"):
        replace(cfg, norm_prior="3d")


def test_the_figure_draws_each_head_s_2d_window(tmp_path) -> None:
    proj = torch.nn.Linear(3, 9)
    local_init(proj)
    p = plots.grid_windows(proj.weight.detach().double().numpy())
    d = np.arange(-plots.MAX_OFFSET_2D, plots.MAX_OFFSET_2D + 1)
    assert p.shape == (9, 13, 13) and np.allclose(p.sum(axis=(-2, -1)), 1)
    for h, (kx, ky) in enumerate(grid_local_offsets(9).tolist()):  # peak at the head's (dx, dy)
        row, col = np.unravel_index(p[h].argmax(), p[h].shape)
        assert (d[col], d[row]) == (kx, ky)
    assert plots.grid_window_std(plots.grid_windows(np.zeros((1, 3))))[0] == pytest.approx(plots.FLAT_STD_2D)
    slot = {"gate_mean": [0.5] * 9, "gate_var": [0.5] * 9, "pos_weight": proj.weight.tolist()}
    runs = [{"preset": "cpu", "task": "pathfinder", "model": "transformer", "norm": "dtn", "seed": seed,
             "norm_params": {"encoder.blocks.0.attn_norm": slot, "encoder.final_norm": slot}} for seed in (0, 1)]
    raster = dict(runs[0], norm_params={"encoder.final_norm": {**slot, "pos_weight": [[1.0, -1.0]] * 9}})
    groups = plots.dtn_groups([*runs, raster])
    assert [g.grid for g in groups] == [False, True] and groups[1].window.shape == (2, 9, 13, 13)
    assert "dtn 2-D" in groups[1].label and groups[1].seeds == [0, 1]
    png = plots.write_dtn_figure([*runs, raster], tmp_path / plots.FIGURE_FILE)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("task, side", [("image", 32), ("pathfinder", 32), ("pathx", 128)])
def test_the_image_tasks_declare_their_pixel_grid(task: str, side: int) -> None:
    for preset in Preset:
        for model in ("transformer", "bigbird", "reformer"):
            cfg = TASKS.get(task)().spec(preset, model)[0]
            assert cfg.grid == (side, side) and cfg.norm_grid == (side, side)
    assert TASKS.get("listops")().spec(Preset.official, "transformer")[0].norm_grid is None
