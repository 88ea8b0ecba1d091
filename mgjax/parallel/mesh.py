"""The device mesh ``(data, fsdp, tensor, expert)`` from config, and where each parameter lands on it.

A parameter's placement follows from its logical axes (``layers.param``) and the rules in
``mgjax.parallel.sharding``: each dimension takes the mesh axes its logical name maps to, unless an earlier
dimension already took them or their size does not divide it (then that dimension is replicated). ``placement``
reports the bytes each device would hold, computed from shapes alone, so a plan for MGM-34B on 128 chips runs on a
laptop. ``shard`` places a model or an optimizer (Adam's moments carry their parameter's axes) and
``batch_sharding`` splits the batch over ``(data, fsdp)``; XLA's SPMD partitioner does the rest."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from math import prod
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import PartitionSpec

from mgjax.parallel.sharding import DEFAULT_RULES, ZERO3_AXES, ZERO3_FLOOR, batch_axes, targets

MESH_AXES = ("data", "fsdp", "tensor", "expert")


@dataclass(frozen=True)
class MeshConfig:
    """Axis sizes within a slice (TPU) or node (GPUs), one of them may be -1: whatever the device count leaves;
    ``dcn_*``: how many slices or nodes the axis also spans, over the slower network between them (data
    parallelism there, as MaxText does: only gradients cross it)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    expert: int = 1
    dcn_data: int = field(default=1, metadata={"help": "slices / nodes that data parallelism spans"})
    dcn_fsdp: int = field(default=1, metadata={"help": "slices / nodes that FSDP spans (ZeRO-3 across them)"})

    def across(self) -> dict[str, int]:
        return {a: getattr(self, f"dcn_{a}", 1) for a in MESH_AXES}

    def sizes(self, devices: int) -> dict[str, int]:
        """The whole mesh's axis sizes on ``devices`` devices in all."""
        across = self.across()
        if any(n < 1 for n in across.values()) or devices % prod(across.values()):
            raise ValueError(f"mesh across slices/nodes {across}: {devices} devices do not split that way")
        within = self.within(devices // prod(across.values()))
        return {a: within[a] * across[a] for a in MESH_AXES}

    def within(self, devices: int) -> dict[str, int]:
        """The axis sizes within one slice or node of ``devices`` devices."""
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        free = [a for a, n in sizes.items() if n == -1]
        if len(free) > 1 or any(n == 0 or n < -1 for n in sizes.values()):
            raise ValueError(f"mesh {sizes}: sizes must be positive, with at most one -1")
        fixed = prod(n for n in sizes.values() if n != -1)
        if free:
            if devices % fixed:
                raise ValueError(f"mesh {sizes}: {devices} devices do not split into {fixed} x (-1)")
            sizes[free[0]] = devices // fixed
        if prod(sizes.values()) != devices:
            raise ValueError(f"mesh {sizes} needs {prod(sizes.values())} devices, not {devices}")
        return sizes


def parse(text: str, default: MeshConfig | None = None) -> MeshConfig:
    """``tensor=2`` over ``default`` (``MeshConfig()``: FSDP takes the devices left): the axes it names replace
    the default's."""
    sizes = {}
    for item in filter(None, text.split(",")):
        axis, eq, value = item.partition("=")
        if not eq or axis.strip() not in MESH_AXES or not value.strip().removeprefix("-").isdigit():
            raise ValueError(f"--mesh {text!r}: expected AXIS=SIZE,... with axes {', '.join(MESH_AXES)}")
        sizes[axis.strip()] = int(value)
    return replace(default if default is not None else MeshConfig(), **sizes)


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    devices = list(devices if devices is not None else jax.devices())
    # Auto axes: XLA's partitioner places activations, the models carry no per-op sharding annotations
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    across = config.across()
    if prod(across.values()) == 1:
        return jax.make_mesh(tuple(config.sizes(len(devices)).values()), MESH_AXES, devices=devices, axis_types=auto)
    return jax.sharding.Mesh(
        _hybrid(config.within(len(devices) // prod(across.values())), across, devices), MESH_AXES, axis_types=auto
    )


def _hybrid(within: dict[str, int], across: dict[str, int], devices: list) -> np.ndarray:
    """Devices in slice (TPU) or process order, cut into ``prod(across)`` equal groups, each laid out for its
    own interconnect; axis ``a`` then runs over ``across[a]`` groups of ``within[a]`` devices."""
    ordered = sorted(devices, key=lambda d: (getattr(d, "slice_index", None) or 0, d.process_index, d.id))
    n, k = prod(across.values()), len(MESH_AXES)
    per = len(ordered) // n
    groups = [mesh_utils.create_device_mesh(tuple(within.values()), ordered[i * per : (i + 1) * per]) for i in range(n)]
    grid = np.stack(groups).reshape(*across.values(), *within.values())
    grid = grid.transpose([j for i in range(k) for j in (i, k + i)])
    return grid.reshape([across[a] * within[a] for a in MESH_AXES])


def spec(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mapping[str, int],
    rules=DEFAULT_RULES,
    fill: Sequence[str] = ZERO3_AXES,
) -> PartitionSpec:
    """The PartitionSpec of one parameter with logical ``axes`` on a mesh of axis sizes ``mesh``; the ``fill``
    axes the rules left unused then split the largest dimension they divide (ZeRO-3), unless it has fewer than
    ``ZERO3_FLOOR`` elements per layer."""
    table = dict(rules)
    used: set[str] = set()
    dims: list[list[str]] = [[] for _ in shape]

    def take(i: int, t: str) -> None:
        # an axis of size 1 shards nothing, a mesh axis can split only one dimension of an array, and each axis
        # taken must still divide the dimension together with those taken before it
        if mesh.get(t, 1) > 1 and t not in used and shape[i] % (prod(mesh[c] for c in dims[i]) * mesh[t]) == 0:
            dims[i].append(t)
            used.add(t)

    for i, name in enumerate(axes):
        for t in targets(table.get(name) if name is not None else None):
            take(i, t)
    # a stacked layer's share is what a scan step gathers: the floor applies to it
    per_layer = prod(n for n, a in zip(shape, axes) if a != "layers")
    for t in fill if per_layer >= ZERO3_FLOOR else ():
        for i in sorted(range(len(shape)), key=lambda i: -shape[i] // prod(mesh[c] for c in dims[i])):
            take(i, t)
    return PartitionSpec(*(None if not d else d[0] if len(d) == 1 else tuple(d) for d in dims))


def shards(s: PartitionSpec, mesh: Mapping[str, int]) -> int:
    """How many pieces ``s`` cuts an array into on a mesh of axis sizes ``mesh``."""
    return prod(mesh[a] for p in s if p is not None for a in targets(p))


@dataclass(frozen=True)
class Placement:
    total_bytes: int
    per_device_bytes: int  # the largest share any device holds
    sharded_fraction: float  # of the bytes: in arrays split over at least one mesh axis
    replicated: tuple[str, ...]  # the replicated arrays, largest first


def placement(model: nnx.Module, mesh: Mapping[str, int], rules=DEFAULT_RULES) -> Placement:
    """Where ``model``'s parameters (abstract or real) land on a mesh of axis sizes ``mesh``."""
    total = per_device = split = 0
    whole = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        nbytes = var.size * var.dtype.itemsize
        s = spec(var.get_metadata().get("out_sharding") or (None,) * len(var.shape), var.shape, mesh, rules)
        n = shards(s, mesh)
        total, per_device = total + nbytes, per_device + nbytes // n
        if n > 1:
            split += nbytes
        else:
            whole.append((nbytes, ".".join(map(str, path))))
    return Placement(total, per_device, split / max(total, 1), tuple(name for _, name in sorted(whole, reverse=True)))


def shardings(tree, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
    """A NamedSharding for every variable of ``tree`` (a module, an optimizer, a tuple of them, or their state):
    parameters and their optimizer moments by their logical axes, everything else (step counts) replicated."""
    sizes = dict(mesh.shape)

    def one(var):
        axes = var.get_metadata().get("out_sharding")
        s = spec(axes, var.shape, sizes, rules) if axes and len(axes) == len(var.shape) else PartitionSpec()
        return jax.sharding.NamedSharding(mesh, s)

    state = tree if isinstance(tree, nnx.State) else nnx.state(tree)
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard(module: nnx.Module, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> None:
    """Places ``module``'s variables on ``mesh`` in place."""
    state = nnx.state(module)
    nnx.update(module, jax.device_put(state, shardings(module, mesh, rules)))


def placer(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
    """For ``convert.hf.load_into``: each process puts only its own shards of a host buffer on its devices, so a
    loaded model is born sharded (the host holds one parameter at a time, never the model)."""
    sizes = dict(mesh.shape)

    def place(buf, var: nnx.Variable) -> jax.Array:
        axes = var.get_metadata().get("out_sharding")
        s = spec(axes, buf.shape, sizes, rules) if axes and len(axes) == buf.ndim else PartitionSpec()
        out = jax.make_array_from_callback(buf.shape, jax.sharding.NamedSharding(mesh, s), lambda i: buf[i])
        return out.block_until_ready()  # at most one parameter in flight on the host

    return place


def batch_shards(mesh: Mapping[str, int], rules=DEFAULT_RULES) -> int:
    """How many ways the batch axis is split on a mesh of axis sizes ``mesh``."""
    return prod(mesh[a] for a in batch_axes(rules))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, rules=DEFAULT_RULES) -> jax.sharding.NamedSharding:
    """Training batches are [micro_batches, batch, ...]: the batch axis is split as the rules' ``batch`` says."""
    axes = tuple(a for a in batch_axes(rules) if mesh.shape[a] > 1)
    return jax.sharding.NamedSharding(mesh, PartitionSpec(None, axes or None, *(None,) * (ndim - 2)))


def global_batch(mesh: jax.sharding.Mesh, local: Mapping[str, np.ndarray], rules=DEFAULT_RULES) -> dict:
    """One global batch from each process's own rows ([micro_batches, rows, ...]): no host ever holds the rest."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim, rules), v) for k, v in local.items()}
