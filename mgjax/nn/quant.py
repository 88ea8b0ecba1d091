"""Weight-only quantization of linear layers, for inference in less memory.

``quantize(model, "int8")`` replaces the ``weight [..., out, in]`` of every matching ``layers.Linear`` (by default
the LLM's attention, MLP and expert projections; never the embeddings, the LM head, a MoE router or the vision
towers) with integers and gives it a ``weight_scale [..., out, in / group]`` in float32; the layer dequantizes in
its compute dtype as it runs (``dequantize``), which XLA fuses into the matmul's operand. Symmetric round-to-nearest
with the scale of each group's largest magnitude:

- ``int8``: one scale per output channel (the group is the whole input), values in [-127, 127];
- ``int4``: one scale per 128 inputs, values in [-7, 7], two to a byte (``uint8 [..., out, in / 2]``, the low
  nibble first), so the saving is real on every backend (XLA:CPU stores its own ``int4`` a byte per value).

Stacked (scanned) layers and Mixtral's stacked experts quantize per layer and per expert, and the scales carry the
weight's logical axes, so they shard like it. ``scheme_of(model)`` says what a model holds; ``save_pretrained``
writes the integers and scales as they are, with a ``quantization_config`` that ``from_pretrained`` reads back.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mgjax.nn.params import path_string
from mgjax.parallel import mesh as mesh_lib

# the LLM's projections in every family we load (HF names; Phi-3's and InternLM2's fused tensors are split on load)
LLM_LINEARS = (
    r"(language_model\.)?model\.layers\.(self_attn|mlp)\.\w+",
    r"(language_model\.)?model\.layers\.block_sparse_moe\.experts\.\w+",
)
METHOD = "mgjax"  # config.json's quantization_config.quant_method for checkpoints this module wrote


@dataclass(frozen=True)
class Scheme:
    """``bits`` per weight (8 or 4); ``group``: inputs sharing one scale (0: all of a row's)."""

    name: str
    bits: int
    group: int

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def group_size(self, d_in: int) -> int:
        return d_in if self.group == 0 or self.group >= d_in else self.group


SCHEMES = {"int8": Scheme("int8", 8, 0), "int4": Scheme("int4", 4, 128)}


def _pack(q: jax.Array) -> jax.Array:
    """int8 values in [-8, 7], [..., n] -> uint8 [..., n / 2], element 2i in the low nibble of byte i."""
    nibbles = q.astype(jnp.uint8) & 0xF
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def _unpack(p: jax.Array) -> jax.Array:
    """``_pack``'s inverse, as int8 [..., 2 * n] (the arithmetic shifts sign-extend each nibble)."""
    b = jax.lax.bitcast_convert_type(p, jnp.int8)
    return jnp.stack([(b << 4) >> 4, b >> 4], axis=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])


def _encode(w: jax.Array, scheme: Scheme) -> tuple[jax.Array, jax.Array]:
    """``(integers, scale)`` of a float weight [..., out, in]."""
    *lead, d_out, d_in = w.shape
    g = scheme.group_size(d_in)
    groups = w.astype(jnp.float32).reshape(*lead, d_out, d_in // g, g)
    amax = jnp.max(jnp.abs(groups), axis=-1)
    scale = jnp.where(amax > 0, amax / scheme.qmax, 1.0)
    q = jnp.clip(jnp.round(groups / scale[..., None]), -scheme.qmax, scheme.qmax).astype(jnp.int8)
    q = q.reshape(*lead, d_out, d_in)
    return (_pack(q) if scheme.bits == 4 else q), scale


def dequantize(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """The weight [..., out, in] in ``dtype`` from its integers (int8, or packed int4 as uint8) and scales."""
    values = _unpack(q) if q.dtype == jnp.uint8 else q
    *lead, d_out, d_in = values.shape
    groups = values.reshape(*lead, d_out, scale.shape[-1], -1).astype(dtype)
    return (groups * scale[..., None].astype(dtype)).reshape(*lead, d_out, d_in)


def _check(path: str, shape: tuple[int, ...], scheme: Scheme) -> None:
    d_in = shape[-1]
    g = scheme.group_size(d_in)
    if d_in % g or (scheme.bits == 4 and g % 2):
        raise ValueError(f"{path}: {d_in} inputs do not split into {scheme.name} groups of {g}")


def _targets(model: nnx.Module, targets: Sequence[str]):
    """The linear layers (modules with a ``weight_scale`` slot) whose dotted path matches a target."""
    compiled = [re.compile(t) for t in targets]
    for path, node in nnx.iter_graph(model):
        name = path_string(path)
        if hasattr(node, "weight_scale") and any(p.fullmatch(name) for p in compiled):
            yield name, node


def _shardings(w: jax.Array, q_shape, s_shape, axes):
    """Where the integers and scales of a sharded weight go: its mesh, by the weight's logical axes."""
    sharding = getattr(w, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    sizes = dict(sharding.mesh.shape)
    return tuple(
        jax.sharding.NamedSharding(sharding.mesh, mesh_lib.spec(a, s, sizes))
        for a, s in ((axes, q_shape), (axes[:-1] + (None,), s_shape))
    )


def quantize(model: nnx.Module, scheme: str | Scheme, targets: Sequence[str] = LLM_LINEARS) -> list[str]:
    """Quantizes the matching linear layers in place (abstract models too: shapes only); returns their paths. One
    weight at a time: the float weight is released once its integers exist."""
    scheme = SCHEMES[scheme] if isinstance(scheme, str) else scheme
    if scheme_of(model) is not None:
        raise ValueError("the model is already quantized")
    found = list(_targets(model, targets))
    if not found:
        raise ValueError(f"no linear layer matches the quantization targets {list(targets)}")
    for name, linear in found:
        w = linear.weight.get_value()
        _check(name, w.shape, scheme)
        axes = tuple(linear.weight.get_metadata().get("out_sharding") or (None,) * w.ndim)
        encode = lambda x: _encode(x, scheme)  # noqa: E731
        if isinstance(w, jax.ShapeDtypeStruct):
            q, s = jax.eval_shape(encode, w)
        else:
            q_shape, s_shape = (x.shape for x in jax.eval_shape(encode, w))
            q, s = jax.jit(encode, out_shardings=_shardings(w, q_shape, s_shape, axes))(w)
        linear.weight.set_value(q)
        linear.weight_scale = nnx.Param(s, out_sharding=axes[:-1] + (None,), eager_sharding=False)
        linear.quant_scheme = scheme.name
    return [name for name, _ in found]


def scheme_of(model: nnx.Module) -> Scheme | None:
    """The scheme a model's linear layers are quantized with; None when none is."""
    names = {getattr(node, "quant_scheme", None) for _, node in nnx.iter_graph(model)} - {None}
    if len(names) > 1:
        raise ValueError(f"the model mixes quantization schemes {sorted(names)}")
    return SCHEMES[names.pop()] if names else None


def config_entry(model: nnx.Module, targets: Sequence[str] = LLM_LINEARS) -> dict | None:
    """config.json's ``quantization_config`` for a quantized model (None for a float one)."""
    scheme = scheme_of(model)
    if scheme is None:
        return None
    return {"quant_method": METHOD, **asdict(scheme), "modules": list(targets)}


def from_config(entry: dict | None, where: str) -> tuple[Scheme, tuple[str, ...]] | None:
    """The scheme and targets a checkpoint's ``quantization_config`` names; an error for another library's."""
    if entry is None:
        return None
    method = entry.get("quant_method") if isinstance(entry, dict) else None
    if method != METHOD:
        raise ValueError(
            f"{where}: quantization_config quant_method {method!r} is not mgjax's; load the float checkpoint "
            "and quantize it with --quant (or mgjax.nn.quant.quantize)"
        )
    scheme = SCHEMES.get(entry.get("name"))
    if scheme is None or (scheme.bits, scheme.group) != (entry.get("bits"), entry.get("group")):
        raise ValueError(f"{where}: unknown quantization {entry!r}; known: {sorted(SCHEMES)}")
    return scheme, tuple(entry.get("modules") or LLM_LINEARS)


def weight_bytes(model: nnx.Module) -> int:
    """Bytes of every parameter (what the model holds in memory, on all its devices together)."""
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
