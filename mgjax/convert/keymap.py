"""How a model's parameters are named in a checkpoint.

An mgjax parameter path *is* its Hugging Face key, with one twist: layers built by ``layers.stack`` hold all
repeats in one array, so ``model.layers.mlp.up_proj.weight[i]`` is HF's ``model.layers.{i}.mlp.up_proj.weight``
(the index goes right after the path component ``layers``). Other checkpoint layouts (timm, MGM's prefixed
towers) are HF names plus an ordered list of regex renames.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from flax import nnx

STACK_COMPONENT = "layers"


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


def is_stacked(var: nnx.Variable) -> bool:
    axes = var.get_metadata().get("out_sharding") or ()
    return len(axes) > 0 and axes[0] == "layers"


def hf_keys(path: tuple, var: nnx.Variable) -> list[str]:
    """The HF keys a parameter covers: one, or one per layer for a stacked parameter."""
    name = path_name(path)
    if not is_stacked(var):
        return [name]
    parts = [str(p) for p in path]
    if STACK_COMPONENT not in parts:
        raise ValueError(f"stacked parameter {name} has no '{STACK_COMPONENT}' component to index")
    at = len(parts) - 1 - parts[::-1].index(STACK_COMPONENT)
    return [".".join(parts[: at + 1] + [str(i)] + parts[at + 1:]) for i in range(var.shape[0])]
