"""Encoders: one module per attention, all sharing :mod:`models.blocks`.

``MODELS`` maps a ``--model`` name to its attention class; :func:`build_model` wraps it in the
shared encoder, pooling and head, with the normalizer injected by registry name.
"""
from lra_dtn import dtn, norms  # noqa: F401  (register every normalizer: the encoders' norm slots name them)
from models.blocks import MODELS, build_model, official_config
from models import transformer, bigbird, reformer  # noqa: F401  (register the encoders)

__all__ = ["MODELS", "build_model", "official_config"]
