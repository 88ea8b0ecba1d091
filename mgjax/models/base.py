"""What every pretrained model shares: a frozen config that round-trips HF ``config.json``, and its key layouts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import jax.numpy as jnp

from mgjax.convert.keymap import HF, KeyLayout
from mgjax.models.registry import model_class


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Base of every model config. ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype, ``remat`` a
    name from ``layers.REMAT_POLICIES``, ``attention_impl`` one of ``attention.BACKENDS``; ``hf`` keeps the original
    ``config.json`` so export writes it back."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    attention_impl: str = "auto"
    hf: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    model_type: ClassVar[str]

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], **overrides) -> "ModelConfig":
        raise NotImplementedError

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` for this config: the original one, with this config's fields written over it."""
        raise NotImplementedError


# overrides a composite model (MGM, InternVL) passes on to each of its sub-model configs
SHARED_OVERRIDES = ("dtype", "param_dtype", "remat", "attention_impl")


def split_overrides(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(shared, own)``: the overrides every sub-model takes, and the composite config's own."""
    shared = {k: v for k, v in overrides.items() if k in SHARED_OVERRIDES}
    return shared, {k: v for k, v in overrides.items() if k not in SHARED_OVERRIDES}


def registered(model_type: str):
    """The mgjax class registered for an HF ``model_type``."""
    return model_class(model_type)


def require(d: Mapping[str, Any], key: str, where: str):
    if key not in d:
        raise ValueError(f"{where}: config.json has no {key!r}")
    return d[key]


class Pretrained:
    """Mixin for models that load from and save to HF checkpoints (see ``mgjax.pretrained``; classes by
    ``model_type`` in ``mgjax.models.registry``)."""

    config_class: ClassVar[type[ModelConfig]]
    key_layouts: ClassVar[dict[str, KeyLayout]] = {"hf": HF}

    @classmethod
    def layouts(cls, config: ModelConfig) -> dict[str, KeyLayout]:
        """The checkpoint layouts this model reads; it writes the first. Override when a layout depends on the
        config (e.g. how many KV heads a packed tensor interleaves)."""
        return cls.key_layouts
