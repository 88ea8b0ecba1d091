"""Mini-InternVL's adaptation modes as data: which parameters train, which stay frozen, and whether the LLM gets
LoRA adapters (spec section 5.4):

- ``full``: ViT, projector and LLM (Mini-InternVL's domain adaptation);
- ``frozen_vit``: projector and LLM, the ViT frozen (InternVL2's 2nd-stage fine-tuning, ``freeze_backbone``);
- ``lora``: LoRA adapters on the LLM's attention and MLP linears alone (rank 16, alpha 32 by default).

Frozen parameters get no optimizer state (``train_step.make_optimizer`` builds AdamW over the trainable ones).
Our model keeps q, k and v (and gate/up) apart where InternLM2 and Phi-3 checkpoints fuse them, so ``lora``
gives each projection its own rank-r adapter where InternVL adapts the fused matrix with one; merged exports are
exact either way.
"""

from __future__ import annotations

from dataclasses import dataclass

from flax import nnx

from mgjax.nn import lora


@dataclass(frozen=True)
class Mode:
    trainable: tuple[str, ...]
    frozen: tuple[str, ...] = ()
    lora: bool = False


MODES = {
    "full": Mode(trainable=(r".*",)),
    "frozen_vit": Mode(trainable=(r".*",), frozen=(r"vision_tower\..*",)),
    "lora": Mode(trainable=lora.TRAINABLE, lora=True),
}


def prepare(model: nnx.Module, mode: str, *, rank: int = 16, alpha: float = 32.0, seed: int = 0) -> Mode:
    """Adds the adapters ``mode`` needs to ``model`` (in place) and returns the mode, whose ``trainable`` and
    ``frozen`` go to ``make_optimizer``."""
    if mode not in MODES:
        raise ValueError(f"adaptation mode must be one of {sorted(MODES)}, not {mode!r}")
    if MODES[mode].lora:
        lora.add(model, rank=rank, alpha=alpha, seed=seed)
    return MODES[mode]
