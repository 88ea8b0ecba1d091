"""Named TPU slices as deviceless devices: XLA's TPU compiler (libtpu) compiles for a pod from a CPU machine.

``devices("v5p-128")`` gives the 64 compile-only devices of a v5p-128 slice (``2xv5p-128``: two slices), to build
a mesh on and ``jit(...).lower(...).compile()`` for, as MaxText's ``train_compile.py`` checks a pod configuration
from a CPU VM; ``chip("v5p-128")`` says what one chip holds. Slice names follow Cloud TPU's: v4 and v5p count
TensorCores (two per chip, driven as one megacore device), v5e and v6e count chips. Needs libtpu
(``pip install "jax[tpu]"``, also in the test extra); on a CPU machine it only compiles.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Generation:
    """``prefix``: the generation's name in libtpu topology strings; ``kind``: its devices' ``device_kind``;
    ``cores_in_name``: TensorCores a slice name counts per chip; ``hbm_gib``: HBM per chip (one megacore device
    on v4 / v5p); ``vmem_mib``: VMEM per TensorCore (``pltpu.get_tpu_info_for_chip``'s)."""

    name: str
    prefix: str
    kind: str
    hbm_gib: float
    vmem_mib: int
    cores_in_name: int
    torus_dims: int
    megacore: bool


GENERATIONS = {
    "v4": Generation("v4", "v4", "TPU v4", 32.0, 16, 2, 3, True),
    "v5e": Generation("v5e", "v5e", "TPU v5 lite", 16.0, 128, 1, 2, False),
    "v5p": Generation("v5p", "v5", "TPU v5", 95.0, 64, 2, 3, True),
    "v6e": Generation("v6e", "v6e", "TPU v6 lite", 32.0, 128, 1, 2, False),
}
_COMPILING_FOR: contextvars.ContextVar = contextvars.ContextVar("compiling_for", default=None)
NAME = re.compile(r"^(?:(\d+)x)?(v4|v5e|v5p|v6e)-(\d+)$")


@dataclass(frozen=True)
class Slice:
    generation: Generation
    chips: int
    slices: int = 1

    @property
    def name(self) -> str:
        n = f"{self.generation.name}-{self.chips * self.generation.cores_in_name}"
        return n if self.slices == 1 else f"{self.slices}x{n}"

    @property
    def grid(self) -> tuple[int, ...]:
        """The chips' torus, as libtpu names it: balanced powers of two, the larger sides last (v5e-32: 4x8,
        v5p-64: 2x4x4, v5p-128: 4x4x4); a 3D slice below 8 chips fills x and y first (v5p-8: 2x2x1)."""
        k, n = int(math.log2(self.chips)), self.generation.torus_dims
        if n == 3 and k < 3:
            return tuple(2 if i < k else 1 for i in range(3))
        return tuple(2 ** (k // n + (i >= n - k % n)) for i in range(n))

    @property
    def hbm_bytes(self) -> int:
        return int(self.generation.hbm_gib * 2**30)


def parse(name: str) -> Slice:
    """``v5p-128``, ``v5e-256``, ``v4-64``, ``v6e-8``, ``2xv5p-128`` -> a ``Slice``."""
    m = NAME.match(name.strip())
    if not m:
        raise ValueError(f"TPU slice {name!r}: expected GEN-N or KxGEN-N with GEN one of {', '.join(GENERATIONS)}")
    slices, gen, n = int(m.group(1) or 1), GENERATIONS[m.group(2)], int(m.group(3))
    if n % gen.cores_in_name or n // gen.cores_in_name & (n // gen.cores_in_name - 1):
        raise ValueError(
            f"TPU slice {name!r}: {gen.name} slices come in powers of two of "
            f"{gen.cores_in_name} {'TensorCores' if gen.cores_in_name > 1 else 'chips'}"
        )
    return Slice(gen, n // gen.cores_in_name, slices)


@lru_cache(maxsize=None)
def devices(name: str) -> tuple:
    """The compile-only devices of a named slice (or slices), ordered as libtpu lays them out."""
    s = parse(name)
    # compiling touches no chip: let this process load libtpu beside others that hold it (tests, a training run)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies  # noqa: PLC0415  (loads libtpu)

    topology = f"{s.generation.prefix}:{'x'.join(map(str, s.grid))}"
    kw = {"chip_config_name": "megacore"} if s.generation.megacore else {}
    if s.slices > 1:
        kw["num_slices"] = s.slices
    try:
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kw)
    except Exception as e:  # libtpu absent or refusing: one line saying so
        raise RuntimeError(f"deviceless TPU devices for {name} ({topology}) need libtpu: {e}") from None
    return tuple(desc.devices)


def chip(name: str) -> Generation:
    return parse(name).generation


@contextlib.contextmanager
def compiling_for(device):
    """Programs traced inside compile for ``device``'s kind (a mesh's device, deviceless or not), whatever this
    process runs on: kernels choose their backend and blocks from ``target()``."""
    token = _COMPILING_FOR.set(device)
    try:
        yield
    finally:
        _COMPILING_FOR.reset(token)


def target():
    """The device programs are being compiled for: ``compiling_for``'s, else this process's first."""
    import jax  # noqa: PLC0415

    return _COMPILING_FOR.get() or jax.devices()[0]


def generation(device) -> Generation | None:
    """The TPU generation of a device (None: not a TPU, or one this table does not know)."""
    return next((g for g in GENERATIONS.values() if g.kind == device.device_kind), None)
