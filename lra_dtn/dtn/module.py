"""The DTN modules (``dtn``, ``dtn_var``): parameters, the authors' local init, and which path computes them.

DTN (Shao et al., ICLR 2022), restated for padded 1-D token sequences in ``specs/dtn.md``:

1. per-head RMS pre-scaling ``x <- x / sqrt(mean_head(x^2) + eps)`` (the authors' code, "for stability");
2. intra-token (LayerNorm) statistics over all ``C`` channels, with the *unbiased* variance;
3. inter-token statistics with a positional prior: per head ``h`` a softmax over the real source tokens
   ``i`` of ``w_h1 * (j - i) + w_h2 * (j - i)^2`` gives ``mu_in`` and ``var_in`` of output token ``j``;
4. mixing by two sigmoid gates per head, ``gate_mean`` and ``gate_var``;
5. standardise, then the affine ``weight``/``bias``.

On an image (``grid=(rows, cols)``: the last ``rows * cols`` tokens are its pixels in raster order) the
prior is the authors' own 2-D one instead: ``pos_proj = nn.Linear(3, H)`` on ``(dx, dy, dx^2 + dy^2)``
of the grid offset, computed by :mod:`lra_dtn.dtn.grid` (``method`` does not apply there).

The module owns the parameters; the 1-D arithmetic lives in a *path*, chosen by ``method`` from
:data:`PATHS`. Every path computes the same numbers (the tests hold each one to the dense float64
reference of :mod:`lra_dtn.dtn.reference`):

* ``conv`` / ``fft``: the eager path of :mod:`lra_dtn.dtn.cpu` with its engine forced;
* ``fused``: the Triton kernels of :mod:`lra_dtn.dtn.fused`, registered when triton is installed;
* ``native``: the C kernels of :mod:`lra_dtn.dtn.native` (CPU), built on first use with the system compiler;
* ``auto``: ``fused`` on CUDA tensors when it is registered, ``native`` on CPU tensors (the eager path
  where it cannot be built, or for the kernels it leaves to it), otherwise the eager path, which picks
  its engine per call from the kernel's width.

A path is ``fn(norm, x, mask) -> y``: it reads the parameters from ``norm``.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from lra_dtn.dtn import cpu, grid as grid_prior
from lra_dtn.dtn.kernel import kernel_logits, local_offsets
from lra_dtn.norms import NORMS, Norm
from lra_dtn.registry import Registry

#: ``method`` name -> path ``fn(norm, x, mask) -> y``.
PATHS: Registry[Callable[["DynamicTokenNorm", Tensor, Tensor | None], Tensor]] = Registry("DTN method")
PATHS.register("conv")(partial(cpu.normalize, method="conv"))
PATHS.register("fft")(partial(cpu.normalize, method="fft"))


#: Device type -> the path ``auto`` takes there, filled in by the modules that provide them: ``fused``
#: (CUDA, when triton is installed) and ``native`` (CPU, C kernels built on first use, see
#: :mod:`lra_dtn.dtn.native`). Anywhere else, the eager path.
DEVICE_PATHS: dict[str, Callable[["DynamicTokenNorm", Tensor, Tensor | None], Tensor]] = {}


@PATHS.register("auto")
def auto(norm: "DynamicTokenNorm", x: Tensor, mask: Tensor | None) -> Tensor:
    """The device's own path from :data:`DEVICE_PATHS`; otherwise the eager path's own choice."""
    path = DEVICE_PATHS.get(x.device.type)
    if path is not None:
        return path(norm, x, mask)
    return cpu.normalize(norm, x, mask, method="auto")


class DynamicTokenNorm(Norm):
    """DTN over ``(B, T, C)`` tokens, ``C = num_heads * head_dim``; registered as ``dtn``.

    Args:
        dim: channels ``C`` (at least 2: the intra-token variance is unbiased).
        num_heads: heads ``H``, the attention's head count. Head ``h`` owns channels
            ``h * C/H ... (h + 1) * C/H - 1``.
        only_var: the ``dtn_var`` variant (the code's ``only_var=True``): no ``gate_mean``, the mean is
            LayerNorm's and only the variance is mixed.
        locality_strength: scale of the local init (the authors use 1).
        eps: under every square root (1e-5 as in the authors' code).
        method: a name in :data:`PATHS`: ``auto`` (the default), ``conv``, ``fft`` (which still
            convolves directly where FFT rounding could swamp some token's weights), ``fused`` (CUDA,
            needs triton), ``native`` (CPU, needs a C compiler). All give the same numbers to float32
            precision. 1-D prior only.
        grid: ``(rows, cols)`` of an image whose pixels are the last ``rows * cols`` tokens, in raster
            order: the 2-D prior (:mod:`lra_dtn.dtn.grid`; tokens before the grid, the CLS, take
            LayerNorm statistics alone). ``None``: a sequence, the 1-D prior.

    Parameters: ``weight``, ``bias`` ``(C,)``; ``gate_mean``, ``gate_var`` ``(H,)`` (before the sigmoid,
    init 0: both statistics mixed half and half); ``pos_proj``, an ``nn.Linear(2, H)`` on the features
    ``(j - i, (j - i)^2)`` of output token ``j`` and source token ``i`` (2-D: ``nn.Linear(3, H)`` on
    ``(dx, dy, dx^2 + dy^2)``, output minus source). Its bias cancels in the softmax (its gradient is
    exactly zero).
    """

    takes_grid = True

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        only_var: bool = False,
        locality_strength: float = 1.0,
        eps: float = 1e-5,
        method: str = "auto",
        grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(dim, num_heads)
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if dim < 2:
            raise ValueError(f"DTN needs at least 2 channels for the unbiased variance, got dim {dim}")
        PATHS.get(method)  # an unknown method fails here, listing the known ones
        if grid is not None and not (len(grid) == 2 and all(isinstance(n, int) and n > 0 for n in grid)):
            raise ValueError(f"grid must be (rows, cols), two positive ints, got {grid!r}")
        self.eps = eps
        self.method = method
        self.grid = None if grid is None else tuple(grid)
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        if only_var:
            self.register_parameter("gate_mean", None)
        else:
            self.gate_mean = nn.Parameter(torch.zeros(num_heads))
        self.gate_var = nn.Parameter(torch.zeros(num_heads))
        self.pos_proj = nn.Linear(3 if self.grid else 2, num_heads)
        self.reset_positional_prior(locality_strength)

    @property
    def prior(self) -> str:
        """``2d`` on a grid, else ``1d``."""
        return "1d" if self.grid is None else "2d"

    @torch.no_grad()
    def reset_positional_prior(self, locality_strength: float = 1.0) -> None:
        """The authors' init: truncated normal (std 0.02), then the local init.

        Head ``h`` gets weight ``2 k_h`` on ``j - i`` and ``-1`` on ``(j - i)^2``, i.e. the logit
        ``-(d - k_h)^2 + k_h^2``: a Gaussian window of variance 1/2 centred at offset ``k_h``. On a grid,
        their 2-D init (:func:`lra_dtn.dtn.grid.local_init`: ``int(sqrt(H))^2`` heads local)."""
        if self.grid is not None:
            grid_prior.local_init(self.pos_proj, locality_strength)
            return
        nn.init.trunc_normal_(self.pos_proj.weight, std=0.02)
        nn.init.zeros_(self.pos_proj.bias)
        offsets = local_offsets(self.num_heads).to(self.pos_proj.weight)
        self.pos_proj.weight[:, 0] = 2 * offsets * locality_strength
        self.pos_proj.weight[:, 1] = -locality_strength

    def kernel_logits(self, length: int) -> Tensor:
        """This module's ``(H, 2T - 1)`` float64 kernel logits (see :func:`kernel_logits`); 1-D prior."""
        return kernel_logits(self.pos_proj.weight, length, self.pos_proj.bias)

    def mean_gate(self) -> Tensor:
        """``gate_mean``, or ``+inf`` for ``dtn_var`` (its mean is LayerNorm's: ``sigmoid(inf) = 1``)."""
        if self.gate_mean is None:
            return self.gate_var.new_full((self.num_heads,), math.inf)
        return self.gate_mean

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected (B, T, {self.dim}) tokens, got {tuple(x.shape)}")
        if mask is not None and mask.shape != x.shape[:2]:
            raise ValueError(f"mask {tuple(mask.shape)} does not match tokens {tuple(x.shape[:2])}")
        if x.numel() == 0:  # no token (an empty batch or sequence): nothing to normalise, zero gradients
            return x * self.weight + self.bias
        if self.grid is not None:
            return grid_prior.normalize(self, x, mask)
        return PATHS.get(self.method)(self, x, mask)

    def extra_repr(self) -> str:
        only_var = ", only_var=True" if self.gate_mean is None else ""
        prior = f"grid={self.grid}" if self.grid else f"method={self.method!r}"
        return f"{self.dim}, num_heads={self.num_heads}{only_var}, eps={self.eps}, {prior}"


NORMS.register("dtn")(DynamicTokenNorm)


@NORMS.register("dtn_var")
class DynamicTokenVarNorm(DynamicTokenNorm):
    """``dtn_var``: DTN with LayerNorm's mean; only the variance is mixed (the code's ``only_var``)."""

    def __init__(self, dim: int, num_heads: int, **kwargs) -> None:
        super().__init__(dim, num_heads, only_var=True, **kwargs)
