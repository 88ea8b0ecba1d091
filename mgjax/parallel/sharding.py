"""Logical axis names: the one vocabulary every parameter is annotated with, and the default logical->mesh
rules (data, not code). ``mgjax.parallel.mesh`` turns them into placements on a ``(data, fsdp, tensor, expert)`` mesh.
"""

from __future__ import annotations

from math import prod
from typing import Sequence

import jax
from jax.sharding import PartitionSpec

# Every logical axis a parameter may carry, and what it means.
LOGICAL_AXES: dict[str, str] = {
    "layers": "stacked repeat of a scanned layer",
    "experts": "stacked experts of a mixture-of-experts layer",
    "vocab": "token vocabulary",
    "embed": "model width of a transformer (residual stream)",
    "heads": "query heads x head_dim, flattened",
    "kv_heads": "key/value heads x head_dim, flattened",
    "mlp": "hidden width of a feed-forward block",
    "norm": "scale/shift of a norm layer",
    "positions": "learned position table",
    "conv_out": "output channels of a convolution",
    "conv_in": "input channels of a convolution",
    "conv_kernel": "spatial extent of a convolution kernel",
}

# Default rules: ZeRO-3-style FSDP on the model width, tensor parallelism on heads / mlp / vocab, expert parallelism
# on stacked experts. Outside the experts, the ``expert`` axis acts as more FSDP (the batch and the model width are
# split over it too), so an expert mesh does not leave attention and embeddings replicated on its devices.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("layers", None),
    ("experts", "expert"),
    ("vocab", "tensor"),
    ("embed", ("fsdp", "expert")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("positions", None),
    ("conv_out", ("fsdp", "expert")),
    ("conv_in", None),
    ("conv_kernel", None),
)

# ZeRO-3 splits every parameter but the smallest: one the rules leave whole on these mesh axes (conv kernels, position
# tables; on `tensor`, the towers' weights the rules give no tensor-parallel axis) is split over them on its largest
# dimension they divide, and gathered when used like any FSDP weight. Arrays under ZERO3_FLOOR elements (norm scales,
# biases: 0.03% of a 7B model's bytes) stay whole, as MaxText and DeepSpeed leave them: split, each would cost an
# all-gather per use for a few KiB saved.
ZERO3_AXES: tuple[str, ...] = ("fsdp", "expert", "tensor")
ZERO3_FLOOR = 1 << 16


def check_axes(axes) -> None:
    unknown = [a for a in axes if a is not None and a not in LOGICAL_AXES]
    if unknown:
        raise ValueError(f"unknown logical axis names {unknown}; declare them in mgjax/parallel/sharding.py")


def targets(rule: str | Sequence[str] | None) -> tuple[str, ...]:
    """The mesh axes a rule's target names (one, several or none)."""
    return (rule,) if isinstance(rule, str) else tuple(rule or ())


def batch_axes(rules=DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes the rules split the batch over."""
    return targets(dict(rules).get("batch"))


def traced_batch_axes(rows: int, rules=DEFAULT_RULES) -> tuple[str, ...]:
    """The batch axes of the mesh being traced under (``jax.set_mesh``) that split ``rows``: () outside a mesh,
    where they have one device, or where they do not divide ``rows``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    axes = tuple(a for a in batch_axes(rules) if a in mesh.axis_names and mesh.shape[a] > 1)
    return axes if axes and rows % prod(mesh.shape[a] for a in axes) == 0 else ()


# Logical axes of activations and the mesh axes each splits over (as big_vision's and MaxText's act_* names): the
# batch as the parameter rules split it, heads / MLP / vocabulary over `tensor` like the weights that make them.
ACTIVATION_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("act_batch", batch_axes()),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def constrain(x: jax.Array, axes: Sequence[str | None], rules=ACTIVATION_RULES) -> jax.Array:
    """``x`` laid out by the logical activation ``axes`` (one per leading dimension; the rest, and None, left to
    XLA) under the mesh being traced under; without one, ``x`` unchanged. A name splits its dimension over all of
    its rule's mesh axes that the mesh has (size > 1) when together they divide it, else leaves it to XLA."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not x.ndim:
        return x
    table, spec = dict(rules), []
    for i in range(x.ndim):
        name = axes[i] if i < len(axes) else None
        split = tuple(a for a in targets(table.get(name)) if a in mesh.axis_names and mesh.shape[a] > 1)
        fits = split and x.shape[i] % prod(mesh.shape[a] for a in split) == 0
        spec.append(split if fits else PartitionSpec.UNCONSTRAINED)
    if all(s is PartitionSpec.UNCONSTRAINED for s in spec):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def constrain_batch(x: jax.Array) -> jax.Array:
    """``x`` split on its leading (batch) axis over the batch axes, under a mesh; its other axes left to XLA (the
    vocabulary stays split over ``tensor``). Without it XLA's propagation follows the FSDP-sharded weights where
    activations meet them: the LM head computed the whole global batch's logits on every chip (the demo on v5e-4:
    f32[128, 64, 43] per chip for 32 local rows), and the towers ran the whole global batch split over channels
    or heads (MGM-2B on v5p-8: ConvNeXt's bf16[32, 192, 192, 768] per chip for 8 local rows)."""
    return constrain(x, ("act_batch",))


def gathered(w: jax.Array) -> jax.Array:
    """``w`` whole on every device of the mesh being traced under (none: unchanged)."""
    if jax.sharding.get_abstract_mesh().empty:
        return w
    return jax.lax.with_sharding_constraint(w, PartitionSpec())
