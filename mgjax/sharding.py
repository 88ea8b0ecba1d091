"""Logical axis names: the one vocabulary every parameter is annotated with, and the default logical->mesh
rules (data, not code). ``mgjax.mesh`` turns them into placements on a ``(data, fsdp, tensor, expert)`` mesh.
"""
from __future__ import annotations

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

# Default rules: ZeRO-3-style FSDP on the model width, tensor parallelism on heads / mlp / vocab.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("experts", "expert"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("positions", None),
    ("conv_out", "fsdp"),
    ("conv_in", None),
    ("conv_kernel", None),
)


def check_axes(axes) -> None:
    unknown = [a for a in axes if a is not None and a not in LOGICAL_AXES]
    if unknown:
        raise ValueError(f"unknown logical axis names {unknown}; declare them in mgjax/sharding.py")
