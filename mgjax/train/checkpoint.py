"""Training checkpoints with Orbax: model and optimizer state plus the data loader's position, written
asynchronously and atomically (Orbax commits a step directory only when complete), the newest ``keep`` kept.

Restoring goes into the *abstract* state of a freshly built model and optimizer, so arrays come back with the
shardings those abstract arrays carry (a different mesh than the one that saved is fine).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mgjax.train import run_dir


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
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), loader=ocp.args.JsonSave(loader_state))
        )

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, model: nnx.Module, optimizer: nnx.Optimizer, step: int | None = None) -> tuple[int, dict]:
        """Load ``step`` (default: the latest) into ``model`` and ``optimizer`` in place; returns the step and the
        loader state to hand to ``Batches.set_state``."""
        step = self.latest() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.manager.directory}")
        target = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), loader=ocp.args.JsonRestore())
        )
        nnx.update(model, out["state"]["model"])
        nnx.update(optimizer, out["state"]["optimizer"])
        return step, out["loader"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
