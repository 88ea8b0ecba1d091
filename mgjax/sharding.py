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

# ZeRO-3 splits every parameter: one the rules leave whole on these mesh axes (norm scales, biases, conv kernels,
# position tables; on `tensor`, the towers' weights the rules give no tensor-parallel axis) is split over them on its
# largest dimension they divide, and gathered when used like any FSDP weight. Only `data` replicates parameters.
ZERO3_AXES: tuple[str, ...] = ("fsdp", "expert", "tensor")


def check_axes(axes) -> None:
    unknown = [a for a in axes if a is not None and a not in LOGICAL_AXES]
    if unknown:
        raise ValueError(f"unknown logical axis names {unknown}; declare them in mgjax/sharding.py")
