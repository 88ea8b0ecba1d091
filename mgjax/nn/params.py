"""Parameters by their HF-style dotted paths: regex selection (what trains, what stays frozen) and counts."""

from __future__ import annotations

import re
from typing import Sequence

import jax
from flax import nnx


def path_string(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def trainable(patterns: Sequence[str], frozen: Sequence[str] = ()):
    """An nnx filter: ``Param``s whose dotted path fully matches one of ``patterns`` and none of ``frozen``."""
    compiled, held = [re.compile(p) for p in patterns], [re.compile(p) for p in frozen]

    def select(path, value) -> bool:
        name = path_string(path)
        return (
            isinstance(value, nnx.Param)
            and any(p.fullmatch(name) for p in compiled)
            and not any(p.fullmatch(name) for p in held)
        )

    return select


def count_params(model: nnx.Module, which=nnx.Param) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, which)))
