"""Run configuration as dataclasses.

The official LRA numbers are written once, in each task module (``tasks/<name>.py``), as instances
of these classes with the config file they come from cited beside them; presets derive from them
with :func:`dataclasses.replace`. Everything here is plain data so a run's JSON holds all of it.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

# The closed choices of the string fields below, written once (checked when a config is built).
POOLINGS = ("cls", "mean", "first")
POS_EMBS = ("sinusoidal", "learned")
DUAL_HEADS = ("concat", "nli")
NORM_PRIORS = ("2d", "1d")
SCHEDULES = ("rsqrt", "cosine")
PRECISIONS = ("fp32", "bf16")


def check_fields(config: Any, positive: tuple[str, ...], non_negative: tuple[str, ...] = (),
                 choices: dict[str, tuple[str, ...]] | None = None) -> None:
    """Reject impossible values when a config is built (a ``--set`` typo fails before any training,
    naming the field), not steps later inside the run."""
    name = type(config).__name__
    for field_name in positive:
        if not getattr(config, field_name) > 0:
            raise ValueError(f"{name}.{field_name} must be positive, got {getattr(config, field_name)!r}")
    for field_name in non_negative:
        if not getattr(config, field_name) >= 0:
            raise ValueError(f"{name}.{field_name} must be >= 0, got {getattr(config, field_name)!r}")
    for field_name, allowed in (choices or {}).items():
        if getattr(config, field_name) not in allowed:
            raise ValueError(f"{name}.{field_name} must be one of {', '.join(allowed)}, "
                             f"got {getattr(config, field_name)!r}")


class Preset(str, enum.Enum):
    """``official``: the LRA config of the task; ``cpu``: learns on 2 CPU cores in minutes;
    ``smoke``: seconds on a CPU, for CI."""

    smoke = "smoke"
    cpu = "cpu"
    official = "official"


@dataclass(frozen=True)
class ModelConfig:
    """Encoder and head. Defaults are the official ``TransformerEncoder`` defaults (spec §6)."""

    vocab_size: int
    num_classes: int
    max_len: int
    num_layers: int
    emb_dim: int
    qkv_dim: int
    mlp_dim: int
    num_heads: int
    dropout: float = 0.1
    attn_dropout: float = 0.1
    pooling: str = "cls"  # "cls" (prepended learned token) | "mean" (over real tokens) | "first" (token 0, no CLS)
    pos_emb: str = "sinusoidal"  # "sinusoidal" | "learned"
    dual_head: str = "concat"  # Retrieval only: "concat" = [u, v] (official), "nli" = [u, v, u*v, u-v]
    # BigBird (LRA models/bigbird/bigbird_attention.py: _DEFAULT_BLOCK_SIZE, num_rand_blocks defaults).
    block_size: int = 64
    num_random_blocks: int = 3
    # Reformer (LRA models/reformer/reformer.py ReformerAttention defaults, spec §7.4).
    n_hashes: int = 1
    n_buckets: int = 10
    # True: every bug and accident of the official code, for every encoder (models/quirks.py lists them).
    official_quirks: bool = False
    # The image grid (rows, cols) of the tokens, declared by the image tasks (Image, Pathfinder, Path-X):
    # their pixels in raster order, after the CLS token if any. None: a sequence.
    grid: tuple[int, int] | None = None
    # DTN's positional prior on a grid: "2d", the authors' (features dx, dy, dx^2 + dy^2 of the grid
    # offset), or "1d", the raster sequence's offsets j - i. Sequences always use 1d.
    norm_prior: str = "2d"

    @property
    def encoder_length(self) -> int:
        """Tokens the encoder sees at most: ``max_len``, plus the CLS token that ``cls`` pooling prepends."""
        return self.max_len + (self.pooling == "cls")

    @property
    def norm_grid(self) -> tuple[int, int] | None:
        """The grid every norm slot is handed: the task's, unless ``norm_prior`` is ``1d``."""
        return self.grid if self.norm_prior == "2d" else None

    def __post_init__(self) -> None:
        check_fields(self, positive=("vocab_size", "num_classes", "max_len", "num_layers", "emb_dim", "qkv_dim",
                                     "mlp_dim", "num_heads", "block_size", "n_hashes", "n_buckets"),
                     non_negative=("dropout", "attn_dropout", "num_random_blocks"),
                     choices={"pooling": POOLINGS, "pos_emb": POS_EMBS, "dual_head": DUAL_HEADS,
                              "norm_prior": NORM_PRIORS})
        if self.grid is not None and (len(self.grid) != 2 or self.grid[0] * self.grid[1] != self.max_len
                                      or min(self.grid) < 1):
            raise ValueError(f"ModelConfig.grid must be (rows, cols) with rows * cols = max_len {self.max_len} "
                             f"(the pixels are the sequence), got {self.grid!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule and loop. AdamW(0.9, 0.98, 1e-9) as Flax Adam with decoupled decay (§6)."""

    batch_size: int
    steps: int
    lr: float
    schedule: str  # "rsqrt": constant*linear_warmup*rsqrt_decay; "cosine": constant*linear_warmup*cosine_decay
    warmup: int
    weight_decay: float
    grad_clip: float | None = None
    eval_every: int = 100
    checkpoint_every: int = 500
    grad_accum: int = 1  # micro-batches per step; 0 = auto, the fewest that fit the memory budget
    precision: str = "fp32"  # "fp32" | "bf16" (autocast on CUDA / CPU)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-9

    def __post_init__(self) -> None:
        check_fields(self, positive=("batch_size", "steps", "lr", "eval_every", "checkpoint_every"),
                     non_negative=("warmup", "weight_decay", "grad_accum", "eps"),
                     choices={"schedule": SCHEDULES, "precision": PRECISIONS})
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be positive or none, got {self.grad_clip!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), e.g. 0.9,0.98, got {self.betas!r}")


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines a run's numbers. ``data`` is the task's own data dataclass."""

    task: str
    model_name: str
    norm: str
    preset: str
    seed: int
    model: ModelConfig
    train: TrainConfig
    data: Any = field(default=None)
    variant: str = ""  # a short hash of any settings changed from the preset, "" for the preset itself

    @property
    def run_id(self) -> str:
        """Folder name of the run: unique per task, encoder, norm, preset, seed and changed settings."""
        suffix = f"-{self.variant}" if self.variant else ""
        return f"{self.task}-{self.model_name}-{self.norm}-{self.preset}-s{self.seed}{suffix}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
