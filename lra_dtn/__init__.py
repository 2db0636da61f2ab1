"""LRA suite comparing Dynamic Token Normalization with LayerNorm.

Importing the package registers every normalizer (``dtn`` lives in its own package beside ``norms``)."""
from lra_dtn import norms, dtn  # noqa: F401
