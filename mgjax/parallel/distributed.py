"""Joining a multi-process run: JAX's multi-controller runtime, one process per host (TPU) or per GPU (SLURM).

Every process runs the same program; ``jax.distributed.initialize`` connects them before any device is touched,
after which ``jax.devices()`` lists the devices of all processes and a mesh spans them. The launchers in
``launch/`` set ``distributed.mode`` (and for ``explicit`` the coordinator and process numbers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import jax

MODES = ("auto", "none", "tpu", "slurm", "explicit")


@dataclass(frozen=True)
class DistributedConfig:
    mode: str = field(
        default="auto",
        metadata={
            "help": "auto (explicit when a coordinator is set, else slurm or tpu from the environment, else none) | "
            "none (one process) | tpu (Cloud TPU: everything discovered) | slurm (one process per GPU, "
            "from SLURM's variables) | explicit (coordinator, num_processes, process_id)"
        },
    )
    coordinator: str = field(default="", metadata={"help": "explicit: host:port of process 0"})
    num_processes: int = 0
    process_id: int = -1
    local_device_ids: tuple[int, ...] = field(
        default=(), metadata={"help": "the local devices this process drives (default: all it sees)"}
    )


def _multi_host_tpu() -> bool:
    # Cloud TPU VMs of a multi-host slice list every worker; a single-host TPU needs no coordination
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def resolve(c: DistributedConfig) -> str:
    """The mode ``auto`` stands for in this environment."""
    if c.mode not in MODES:
        raise ValueError(f"distributed.mode must be one of {', '.join(MODES)}, not {c.mode!r}")
    if c.mode != "auto":
        return c.mode
    if c.coordinator:
        return "explicit"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    return "tpu" if _multi_host_tpu() else "none"


def initialize(c: DistributedConfig) -> str:
    """Joins the run ``c`` describes (before anything touches a device); returns the mode used."""
    mode = resolve(c)
    local = list(c.local_device_ids) or None
    if mode in ("tpu", "slurm"):
        jax.distributed.initialize(local_device_ids=local)
    elif mode == "explicit":
        if not c.coordinator or c.num_processes < 1 or not 0 <= c.process_id < c.num_processes:
            raise ValueError(
                "distributed.mode explicit needs distributed.coordinator (host:port), "
                "distributed.num_processes >= 1 and 0 <= distributed.process_id < num_processes; got "
                f"{c.coordinator!r}, {c.num_processes}, {c.process_id}"
            )
        jax.distributed.initialize(c.coordinator, c.num_processes, c.process_id, local_device_ids=local)
    return mode
