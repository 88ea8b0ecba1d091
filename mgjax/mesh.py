"""The device mesh ``(data, fsdp, tensor, expert)`` from config, and where each parameter lands on it.

A parameter's placement follows from its logical axes (``layers.param``) and the rules in ``mgjax.sharding``: each
dimension takes the mesh axes its logical name maps to, unless an earlier dimension already took them or their
size does not divide it (then that dimension is replicated). ``placement`` reports the bytes each device would
hold, computed from shapes alone, so a plan for MGM-34B on 128 chips runs on a laptop. ``shard`` places a model
or an optimizer (Adam's moments carry their parameter's axes) and ``batch_sharding`` splits the batch over
``(data, fsdp)``; XLA's SPMD partitioner does the rest.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import PartitionSpec

from mgjax.sharding import DEFAULT_RULES

MESH_AXES = ("data", "fsdp", "tensor", "expert")


@dataclass(frozen=True)
class MeshConfig:
    """Axis sizes; one of them may be -1: whatever the device count leaves."""
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    expert: int = 1

    def sizes(self, devices: int) -> dict[str, int]:
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


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    devices = list(devices if devices is not None else jax.devices())
    sizes = config.sizes(len(devices))
    # Auto axes: XLA's partitioner places activations, the models carry no per-op sharding annotations
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mapping[str, int],
         rules=DEFAULT_RULES) -> PartitionSpec:
    """The PartitionSpec of one array with logical ``axes`` on a mesh of axis sizes ``mesh``."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, dim in zip(axes, shape):
        targets = _targets(table.get(name) if name is not None else None)
        # an axis of size 1 shards nothing, and a mesh axis can split only one dimension of an array
        targets = tuple(t for t in targets if mesh.get(t, 1) > 1 and t not in used)
        if targets and dim % prod(mesh[t] for t in targets) == 0:
            used.update(targets)
            out.append(targets[0] if len(targets) == 1 else targets)
        else:
            out.append(None)
    return PartitionSpec(*out)


def _targets(rule: str | Sequence[str] | None) -> tuple[str, ...]:
    return (rule,) if isinstance(rule, str) else tuple(rule or ())


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
        shards = prod(mesh[a] for p in s if p is not None for a in ((p,) if isinstance(p, str) else p))
        total, per_device = total + nbytes, per_device + nbytes // shards
        if shards > 1:
            split += nbytes
        else:
            whole.append((nbytes, ".".join(map(str, path))))
    return Placement(total, per_device, split / max(total, 1), tuple(name for _, name in sorted(whole, reverse=True)))


def shardings(module: nnx.Module, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
    """A NamedSharding for every variable of ``module`` (an optimizer's state included): parameters and their
    optimizer moments by their logical axes, everything else (step counts, scalars) replicated."""
    sizes = dict(mesh.shape)

    def one(var):
        axes = var.get_metadata().get("out_sharding")
        s = spec(axes, var.shape, sizes, rules) if axes and len(axes) == len(var.shape) else PartitionSpec()
        return jax.sharding.NamedSharding(mesh, s)

    return jax.tree.map(one, nnx.state(module), is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard(module: nnx.Module, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> None:
    """Places ``module``'s variables on ``mesh`` in place."""
    state = nnx.state(module)
    nnx.update(module, jax.device_put(state, shardings(module, mesh, rules)))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, rules=DEFAULT_RULES) -> jax.sharding.NamedSharding:
    """Training batches are [micro_batches, batch, ...]: the batch axis is split as the rules' ``batch`` says."""
    axes = tuple(a for a in _targets(dict(rules).get("batch")) if mesh.shape[a] > 1)
    return jax.sharding.NamedSharding(mesh, PartitionSpec(None, axes or None, *(None,) * (ndim - 2)))
