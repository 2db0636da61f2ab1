"""Dynamic Token Normalization (Shao et al., ICLR 2022) for padded 1-D token sequences and image grids.

One job per file:

* :mod:`~lra_dtn.dtn.module`: the ``dtn`` / ``dtn_var`` modules, their parameters and local init, and
  the registry of paths that compute them (``method``);
* :mod:`~lra_dtn.dtn.kernel`: the positional prior: logits over token offsets, the kernel's support;
* :mod:`~lra_dtn.dtn.grid`: the authors' 2-D prior on an image grid (``grid=(rows, cols)``) and its path
  (two 1-D passes of a factorised kernel, hand-written backward); the CLS token takes LayerNorm's statistics;
* :mod:`~lra_dtn.dtn.cpu`: the eager path (depthwise or FFT convolution, hand-written backward);
* :mod:`~lra_dtn.dtn.native`: the fused CPU path (``method="native"``, what ``auto`` takes on CPU): two C
  kernels (``native.c``) built with the system compiler on first use, the eager path where they cannot be;
* :mod:`~lra_dtn.dtn.fused`: the fused Triton path (``method="fused"``, what ``auto`` takes on CUDA),
  registered when triton is installed (the extra ``.[gpu]``; CUDA builds of torch ship it);
* :mod:`~lra_dtn.dtn.reference`: the dense float64 reference every path is tested against.

Importing this package registers ``dtn`` and ``dtn_var`` in :data:`lra_dtn.norms.NORMS`.
"""
from lra_dtn.dtn.kernel import DYNAMIC_RANGE, TRUNCATION, kernel_logits, local_offsets
from lra_dtn.dtn.module import PATHS, DynamicTokenNorm, DynamicTokenVarNorm
from lra_dtn.dtn import fused  # noqa: E402,F401  (registers the "fused" path when triton is installed)
from lra_dtn.dtn import native  # noqa: E402,F401  (registers the "native" path, built on first use)

__all__ = [
    "DYNAMIC_RANGE", "PATHS", "TRUNCATION", "DynamicTokenNorm", "DynamicTokenVarNorm", "kernel_logits",
    "local_offsets",
]
