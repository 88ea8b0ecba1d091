"""Training checkpoints with Orbax: model and optimizer state plus the data loader's position, written
asynchronously and atomically (Orbax commits a step directory only when complete), the newest ``keep`` kept.

Restoring goes into the *abstract* state of a freshly built model and optimizer, so arrays come back with the
shardings those abstract arrays carry (a different mesh than the one that saved is fine). Each checkpoint carries a
fingerprint of its arrays (a position-weighted sum of their bits, computed on the devices when saved); a restore
checks it, so a checkpoint whose files were truncated, cut short or flipped is found out, named in one line, and the
next older one restored instead.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mgjax.train import run_dir


class CheckpointError(RuntimeError):
    """No checkpoint restores; the message names the directory and each step's reason."""


@jax.jit
def fingerprint(state) -> dict:
    """One uint32 per array: the sum of its bit patterns, each times a constant odd multiplier of its position
    (wrapping), so that a changed, moved or lost value changes it; computed where the arrays are, sharded or not."""

    def one(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        bits = x.reshape(-1)
        if x.dtype != jnp.bool_:
            bits = jax.lax.bitcast_convert_type(bits, jnp.dtype(f"uint{x.dtype.itemsize * 8}"))
        position = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(0x9E3779B1) + jnp.uint32(1)
        return jnp.sum((bits.astype(jnp.uint32) ^ position) * jnp.uint32(0x85EBCA77), dtype=jnp.uint32)

    return jax.tree.map(one, state)


def _digest(state) -> list[int]:
    return [int(v) for v in jax.tree.leaves(jax.device_get(fingerprint(state)))]


class Checkpoints:
    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, asynchronous: bool = True):
        self.manager = ocp.CheckpointManager(
            epath.Path(directory) if run_dir.is_uri(directory) else os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous),
        )

    def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer, loader_state: dict[str, Any]) -> None:
        """Start writing ``step`` (returns before the bytes are on disk when asynchronous)."""
        state = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                loader=ocp.args.JsonSave(loader_state),
                fingerprint=ocp.args.JsonSave({"arrays": _digest(state)}),
            ),
        )

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, model: nnx.Module, optimizer: nnx.Optimizer, step: int | None = None) -> tuple[int, dict]:
        """Load ``step`` (default: the newest that restores whole) into ``model`` and ``optimizer`` in place;
        returns the step and the loader state to hand to ``Batches.set_state``. A step that does not restore is
        named on stderr with its reason, and the next older one tried; ``CheckpointError`` when none restores."""
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint under {self.manager.directory}")
        reasons = []
        for s in steps:
            try:
                return s, self._restore(s, model, optimizer)
            except Exception as e:  # a damaged checkpoint raises whatever its reader meets
                reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
                print(f"checkpoint step {s} in {self.manager.directory} does not restore ({reason})", file=sys.stderr)
                reasons.append(f"step {s}: {reason}")
        raise CheckpointError(f"no checkpoint under {self.manager.directory} restores: {'; '.join(reasons)}")

    def _restore(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer) -> dict:
        target = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        items = {"state": ocp.args.StandardRestore(abstract), "loader": ocp.args.JsonRestore()}
        verified = (epath.Path(self.manager.directory) / str(step) / "fingerprint").exists()
        if verified:
            items["fingerprint"] = ocp.args.JsonRestore()
        elif (epath.Path(self.manager.directory) / str(step) / "state").exists():
            print(f"checkpoint step {step} predates fingerprints: restored unverified", file=sys.stderr)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        if verified and _digest(out["state"]) != out["fingerprint"]["arrays"]:
            raise ValueError("its arrays do not match the fingerprint saved with them (damaged files)")
        nnx.update(model, out["state"]["model"])
        nnx.update(optimizer, out["state"]["optimizer"])
        return out["loader"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
