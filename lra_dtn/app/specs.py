"""From CLI names to a :class:`~lra_dtn.config.RunSpec`: task preset + encoder + norm + overrides."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from typing import Any

from lra_dtn.config import Preset, RunSpec
from lra_dtn.norms import NORMS, check_pooling
from lra_dtn.registry import UnknownName
from models import MODELS, official_config
from tasks import TASKS


def parse_value(text: str, kind: Any) -> Any:
    """``"3"`` -> 3 for an ``int`` field, ``"none"`` -> None for an optional one (``X | None``),
    ``"0.9,0.98"`` -> a tuple of floats, ``"true"`` -> True; a ``str`` field takes the text as it is."""
    options = typing.get_args(kind)
    if type(None) in options:
        if text.lower() in ("none", "null"):
            return None
        (kind,) = [option for option in options if option is not type(None)]
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if typing.get_origin(kind) is tuple:
        return tuple(float(v) for v in text.split(","))
    return kind(text) if kind in (int, float) else text


def apply_settings(section: Any, settings: dict[str, str], where: str) -> Any:
    """``dataclasses.replace`` from ``name=value`` strings, rejecting unknown names with the list."""
    if not settings:
        return section
    hints = typing.get_type_hints(type(section))
    unknown = sorted(set(settings) - set(hints))
    if unknown:
        raise UnknownName(f"unknown {where} setting(s) {', '.join(unknown)}; valid: {', '.join(hints)}")
    values = {}
    for name, text in settings.items():
        try:
            values[name] = parse_value(text, hints[name])
        except ValueError as err:
            raise ValueError(f"--set {where}.{name}={text}: {err}") from None
    try:
        return dataclasses.replace(section, **values)
    except ValueError as err:  # the config's own checks (e.g. a non-positive batch size)
        changed = " ".join(f"{where}.{k}={v}" for k, v in settings.items())
        raise ValueError(f"--set {changed}: {err}") from None


def split_settings(pairs: list[str]) -> dict[str, dict[str, str]]:
    """``["train.lr=1e-3", "data.num_train=500"]`` -> ``{"train": {"lr": "1e-3"}, "data": {...}}``."""
    out: dict[str, dict[str, str]] = {"model": {}, "train": {}, "data": {}}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in out:
            raise ValueError(f"--set {pair!r}: expected model.NAME=VALUE, train.NAME=VALUE or data.NAME=VALUE")
        out[section][name] = value
    return out


def make_spec(task: str, model: str, norm: str, preset: str | Preset = Preset.cpu, seed: int = 0,
              settings: list[str] | None = None, train_changes: dict[str, Any] | None = None) -> RunSpec:
    """The preset's config for (task, model), with typed ``train_changes`` (the CLI's shortcut flags) and
    then ``section.name=value`` settings applied on top. The official preset is the task's config file as
    the encoder's official code used it (``official_config``: no attention dropout for BigBird and Reformer)."""
    task_cls = TASKS.get(task)
    MODELS.get(model)
    NORMS.get(norm)
    preset = Preset(preset)
    base = task_cls().spec(preset, model)
    if preset == Preset.official:  # the config file as the encoder's official code used it
        base = (official_config(model, base[0]), *base[1:])
    changes = split_settings(settings or [])
    flagged = (base[0], dataclasses.replace(base[1], **(train_changes or {})), base[2])
    model_cfg, train_cfg, data_opts = (apply_settings(section, changes[name], name)
                                       for section, name in zip(flagged, ("model", "train", "data")))
    if "max_length" in changes["data"] and "max_len" not in changes["model"]:
        # A longer or shorter data cut (e.g. Text 4000, the paper's) resizes the position table too.
        model_cfg = dataclasses.replace(model_cfg, max_len=data_opts.max_length)
    check_pooling(norm, model_cfg.pooling)
    return RunSpec(task=task, model_name=model, norm=norm, preset=preset.value, seed=seed, model=model_cfg,
                   train=train_cfg, data=data_opts, variant=variant_hash(base, (model_cfg, train_cfg, data_opts)))


def variant_hash(base: tuple, resolved: tuple) -> str:
    """``""`` when the resolved config is the preset's, else a short hash of the changed fields."""
    changed = {f"{type(b).__name__}.{k}": v for b, r in zip(base, resolved)
               for k, v in dataclasses.asdict(r).items() if getattr(b, k) != getattr(r, k)}
    if not changed:
        return ""
    return "x" + hashlib.sha256(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:6]
