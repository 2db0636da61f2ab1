"""The official LRA code's bugs and accidents, all behind one switch: ``ModelConfig.official_quirks``.

This suite corrects them by default. ``--set model.official_quirks=true`` turns every one of them on, for
every encoder and task, so that the paper's numbers can be reproduced (its models were trained with them).
Each module reads the flags that concern it from :meth:`Quirks.of`; a flag is read in one place only.
Sources are google-research/long-range-arena ``lra_benchmarks/models/`` (spec §6, §7.3, §7.4, §11).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lra_dtn.config import ModelConfig


@dataclass(frozen=True)
class Quirks:
    """One flag per official quirk; all off (the default) or all on (``official_quirks=true``)."""

    # Every encoder (``TransformerEncoder``, ``BigBirdEncoder``, ``ReformerEncoder``; read in models/blocks.py).
    # The input pipelines pad every example to ``max_len``, and padding takes part where the mask does not
    # reach it (MEAN pooling, Reformer): the encoder pads every batch to max_len.
    pads_to_max_len: bool = False
    # ``src_padding_mask = inputs > 0`` on every task: on Image and Pathfinder pixel value 0 is padding.
    mask_is_nonzero_ids: bool = False
    # The CLS token takes token 0's mask (``src_padding_mask[:, :1]``): masked when pixel 0 is 0.
    cls_copies_first_mask: bool = False
    # ``classifier_head`` MEAN is ``jnp.mean(encoded, axis=1)``: over every position, padding included.
    mean_counts_padding: bool = False
    # The padding mask also masks queries. Dense (flax ``make_padding_mask``): every logit of a masked query
    # is -1e10, so its softmax is uniform and its output the mean of all values. BigBird: ``* seq_m_pad``
    # zeroes the output of masked queries. (Reformer ignores the mask altogether, below.)
    masks_queries: bool = False

    # BigBird (bigbird_attention.py).
    # ``get_block_rand_mask(last_idx=min(seq_length, 1024))``: random blocks only below 1024 / block_size.
    random_blocks_below_1024: bool = False
    # ``extra_len = block_size - (orig_seqlen % block_size)``: a whole padding block when already a multiple.
    whole_padding_block: bool = False
    # The padding mask is padded with ``constant_values=-1e9``, i.e. True: the added zeros are real keys.
    padding_block_is_real: bool = False
    # ``connectivity_seed = hash(module path)``: the graph depends on the layer, not on the run's seed.
    graph_seeded_by_layer: bool = False

    # Reformer (reformer_attention.py).
    # ``dots = einsum(bq, bk) * (qdim ** 0.5)``: logits multiplied by sqrt(d), not divided.
    logits_times_sqrt_d: bool = False
    # ``padding_mask`` is accepted and never used: padding is attended to and attends.
    ignores_mask: bool = False
    # ``qkv_features = inputs_q.shape[-1]``: the q/k/v width is emb_dim, whatever qkv_dim says.
    qkv_width_is_emb_dim: bool = False
    # The heads are reshaped back to ``[batch, length, qkv_features]``: no output projection.
    no_output_projection: bool = False
    # ``nn.stochastic(jax.random.PRNGKey(0))``: the same rotations in every layer, head and step.
    fixed_rotations: bool = False
    # ``extra_len = chunk_len - (qlength % chunk_len)`` with ``chunk_len = 10``: 1 to 10 zero positions
    # (real, as the mask is ignored) are always appended, e.g. Retrieval's 4000 tokens become 4010.
    whole_padding_chunk: bool = False

    @classmethod
    def of(cls, cfg: ModelConfig) -> Quirks:
        """The quirks a model built from ``cfg`` reproduces: all of them or none."""
        return OFFICIAL if cfg.official_quirks else NONE


NONE = Quirks()
OFFICIAL = Quirks(**{f.name: True for f in dataclasses.fields(Quirks)})
