"""How a model's parameters are named in a checkpoint.

An mgjax parameter path *is* its Hugging Face key, with one twist: repeats built by ``layers.stack`` live in one
array whose leading logical axes say what was stacked. ``model.layers.mlp.up_proj.weight[i]`` is HF's
``model.layers.{i}.mlp.up_proj.weight`` (a ``layers`` axis puts its index after the path component ``layers``),
and a Mixtral expert weight ``[L, E, ...]`` also gets its expert index after ``experts``. Other checkpoint
layouts (timm, MGM's prefixed towers) are HF names plus an ordered list of regex renames.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from flax import nnx

# stacking logical axis -> the path component its index follows in an HF key
STACK_AXES = {"layers": "layers", "experts": "experts"}


@dataclass(frozen=True)
class KeyLayout:
    """``renames``: (pattern, replacement) regexes applied in order to an HF-shaped key to give this layout's key.
    ``ignore``: regexes of checkpoint keys known to carry nothing the model needs (buffers, unused heads)."""
    renames: tuple[tuple[str, str], ...] = ()
    ignore: tuple[str, ...] = ()
    _compiled: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_compiled", tuple((re.compile(p), r) for p, r in self.renames))

    def rename(self, hf_key: str) -> str:
        for pattern, repl in self._compiled:
            hf_key = pattern.sub(repl, hf_key)
        return hf_key

    def ignored(self, key: str) -> bool:
        return any(re.fullmatch(p, key) for p in self.ignore)


HF = KeyLayout()


def path_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def stack_depth(var: nnx.Variable) -> int:
    """How many leading axes of ``var`` are stacking axes (0 for an ordinary parameter)."""
    axes = var.get_metadata().get("out_sharding") or ()
    n = 0
    while n < len(axes) and axes[n] in STACK_AXES:
        n += 1
    return n


def hf_keys(path: tuple, var: nnx.Variable) -> list[tuple[tuple[int, ...], str]]:
    """``(index, key)`` for every HF tensor a parameter holds: ``var[index]`` is checkpoint tensor ``key``."""
    parts = [str(p) for p in path]
    depth = stack_depth(var)
    if not depth:
        return [((), ".".join(parts))]
    axes = var.get_metadata()["out_sharding"][:depth]
    at, pos = [], -1
    for axis in axes:
        try:
            pos = parts.index(STACK_AXES[axis], pos + 1)
        except ValueError:
            raise ValueError(f"stacked parameter {path_name(path)} has no '{STACK_AXES[axis]}' component to "
                             "index") from None
        at.append(pos)
    out = []
    for index in np.ndindex(*var.shape[:depth]):
        key = list(parts)
        for pos, i in sorted(zip(at, index), reverse=True):
            key.insert(pos + 1, str(i))
        out.append((index, ".".join(key)))
    return out
