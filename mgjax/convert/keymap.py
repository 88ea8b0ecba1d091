"""How a model's parameters are named in a checkpoint.

An mgjax parameter path *is* its Hugging Face key, with one twist: repeats built by ``layers.stack`` live in one
array whose leading logical axes say what was stacked. ``model.layers.mlp.up_proj.weight[i]`` is HF's
``model.layers.{i}.mlp.up_proj.weight`` (a ``layers`` axis puts its index after the path component ``layers``),
and a Mixtral expert weight ``[L, E, ...]`` also gets its expert index after ``experts``.

Other checkpoint layouts are HF names plus a ``KeyLayout``: ordered regex renames, fused tensors (one checkpoint
tensor whose rows hold several of our parameters, like Phi-3's ``qkv_proj`` or InternLM2's per-KV-head packed
``wqkv``), and nested layouts for sub-models under a prefix (an InternVL checkpoint holds a ViT and an LLM,
each in its own naming).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import numpy as np
from flax import nnx

# stacking logical axis -> the path components its index may follow in an HF key (InternViT names its "layer")
STACK_AXES = {"layers": ("layers", "layer"), "experts": ("experts",)}


@dataclass(frozen=True)
class Fused:
    """Checkpoint tensor ``key`` (a key suffix) holds the parameters ``parts`` (suffixes) stacked along rows.

    With ``groups`` > 1 the rows come in that many equal groups, each holding its share of every part in order
    (InternLM2: per KV head, that head's queries, then its key, then its value)."""

    key: str
    parts: tuple[str, ...]
    groups: int = 1


@dataclass(frozen=True)
class Target:
    """Where one HF-named tensor lives in a checkpoint: all of ``key``, or part ``part`` of a fused ``key``."""

    key: str
    part: int = -1
    parts: int = 1
    groups: int = 1

    @property
    def fused(self) -> bool:
        return self.part >= 0


@dataclass(frozen=True)
class KeyLayout:
    """``renames``: (pattern, replacement) regexes applied in order to an HF-shaped key to give this layout's key.
    ``ignore``: regexes of checkpoint keys known to carry nothing the model needs (buffers, unused heads).
    ``fused``: tensors stored fused. ``children``: (model prefix, checkpoint prefix, layout) for sub-models; a
    key under a model prefix is mapped by that layout alone, then given the checkpoint prefix."""

    renames: tuple[tuple[str, str], ...] = ()
    ignore: tuple[str, ...] = ()
    fused: tuple[Fused, ...] = ()
    children: tuple[tuple[str, str, "KeyLayout"], ...] = ()
    _compiled: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_compiled", tuple((re.compile(p), r) for p, r in self.renames))

    def rename(self, hf_key: str) -> str:
        for pattern, repl in self._compiled:
            hf_key = pattern.sub(repl, hf_key)
        return hf_key

    def locate(self, hf_key: str) -> Target:
        for model_prefix, ckpt_prefix, child in self.children:
            if hf_key.startswith(model_prefix):
                t = child.locate(hf_key[len(model_prefix) :])
                return replace(t, key=ckpt_prefix + t.key)
        for f in self.fused:
            for i, part in enumerate(f.parts):
                if hf_key == part or hf_key.endswith("." + part):
                    return Target(self.rename(hf_key[: len(hf_key) - len(part)] + f.key), i, len(f.parts), f.groups)
        return Target(self.rename(hf_key))

    def ignored(self, key: str) -> bool:
        if any(re.fullmatch(p, key) for p in self.ignore):
            return True
        return any(key.startswith(ckpt) and child.ignored(key[len(ckpt) :]) for _, ckpt, child in self.children)


HF = KeyLayout()


def row_blocks(sizes: list[int], part: int, groups: int) -> list[tuple[int, int, int]]:
    """``(dst, src, n)`` row copies that take part ``part`` out of a fused tensor whose parts have ``sizes`` rows:
    rows ``src:src+n`` of the fused tensor are rows ``dst:dst+n`` of the part."""
    if any(s % groups for s in sizes):
        raise ValueError(f"fused parts of {sizes} rows do not split into {groups} groups")
    share = [s // groups for s in sizes]
    group = sum(share)
    return [(g * share[part], g * group + sum(share[:part]), share[part]) for g in range(groups)]


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
        pos = next((i for i in range(pos + 1, len(parts)) if parts[i] in STACK_AXES[axis]), None)
        if pos is None:
            raise ValueError(f"stacked parameter {path_name(path)} has no {STACK_AXES[axis]} component to index")
        at.append(pos)
    out = []
    for index in np.ndindex(*var.shape[:depth]):
        key = list(parts)
        for pos, i in sorted(zip(at, index), reverse=True):
            key.insert(pos + 1, str(i))
        out.append((index, ".".join(key)))
    return out
