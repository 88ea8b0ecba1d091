"""Building blocks shared by every model: parameters with logical axes, HF-layout linear layers, norms,
stochastic depth, and the stack-and-scan machinery for repeated layers.

Weights keep the PyTorch layout (Linear ``weight`` is ``[out, in]``, convolutions are ``OIHW``) so that a
parameter's path and shape equal its Hugging Face key and shape; XLA folds the transposed contraction into
the matmul, so this costs nothing at run time and makes conversion a rename.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mgjax.nn import quant
from mgjax.parallel import sharding

Axes = tuple[str | None, ...]

# ---------------------------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------------------------


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: Axes, dtype) -> nnx.Param:
    """A parameter annotated with logical axis names (one per dimension).

    Sharding is applied later from the abstract state (``sharding.py``), never eagerly at creation, so a model
    can be built on one CPU without a mesh in scope.
    """
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {tuple(shape)}")
    sharding.check_axes(axes)
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


def ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


def zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def normal(std: float) -> Callable:
    return nnx.initializers.normal(std)


# ---------------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------------


class Linear(nnx.Module):
    """``y = x @ weight.T + bias`` with ``weight: [out, in]`` exactly as ``torch.nn.Linear`` stores it; plus
    ``lora_scale * (x @ lora_a.T) @ lora_b.T`` once ``mgjax.nn.lora`` has given it a low-rank adapter. After
    ``mgjax.nn.quant.quantize`` the weight holds integers and ``weight_scale`` their scales."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        axes: tuple[str, str],
        bias: bool,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
        std: float = 0.02,
    ):
        self.weight = param(rngs, normal(std), (d_out, d_in), axes, param_dtype)
        self.bias = param(rngs, zeros, (d_out,), (axes[0],), param_dtype) if bias else None
        self.dtype = dtype
        self.lora_a = self.lora_b = nnx.data(None)  # [rank, in], [out, rank]: data, so adapters can join later
        self.lora_scale = 1.0
        self.weight_scale = nnx.data(None)  # [out, in / group]: data, so quantization can add it later
        self.quant_scheme = None

    def kernel(self) -> jax.Array:
        """The weight in the compute dtype (dequantized when it holds integers)."""
        if self.weight_scale is None:
            return self.weight[...].astype(self.dtype)
        return quant.dequantize(self.weight[...], self.weight_scale[...], self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        contract = (((x.ndim - 1,), (1,)), ((), ()))
        y = jax.lax.dot_general(x, self.kernel(), contract)
        if self.lora_a is not None:
            low = jax.lax.dot_general(x, self.lora_a[...].astype(self.dtype), contract)
            y = y + self.lora_scale * jax.lax.dot_general(low, self.lora_b[...].astype(self.dtype), contract)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Conv2d(nnx.Module):
    """2-D convolution on NHWC activations with a ``torch.nn.Conv2d``-layout kernel
    ``weight: [out, in/groups, kh, kw]``."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        kernel: int,
        *,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bias: bool = True,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
        std: float = 0.02,
    ):
        axes = ("conv_out", "conv_in", "conv_kernel", "conv_kernel")
        self.weight = param(rngs, normal(std), (d_out, d_in // groups, kernel, kernel), axes, param_dtype)
        self.bias = param(rngs, zeros, (d_out,), ("conv_out",), param_dtype) if bias else None
        self.stride, self.padding, self.groups, self.dtype = stride, padding, groups, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        # gathered whole under a mesh, as FSDP gathers a layer's weights: otherwise XLA's partitioner keeps the
        # kernel split over its output channels and gathers the whole global batch of images onto every chip
        x, w = sharding.constrain_batch(x.astype(self.dtype)), sharding.gathered(self.weight[...].astype(self.dtype))
        if self.groups == x.shape[-1] == w.shape[0] and self.stride == 1:
            # XLA:CPU differentiates a depthwise conv ~30x slower than the same sum of shifted products.
            y = jax.lax.platform_dependent(
                x, w, cpu=partial(_depthwise_shifted, padding=self.padding), default=self._conv
            )
        else:
            y = self._conv(x, w)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return sharding.constrain_batch(y)

    def _conv(self, x: jax.Array, w: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(
            x,
            w,
            window_strides=(self.stride,) * 2,
            padding=[(self.padding, self.padding)] * 2,
            feature_group_count=self.groups,
            dimension_numbers=("NHWC", "OIHW", "NHWC"),
        )


def _depthwise_shifted(x: jax.Array, w: jax.Array, padding: int) -> jax.Array:
    """A stride-1 depthwise conv (``w``: [C, 1, kh, kw]) on NHWC ``x`` as kh*kw shifted multiply-adds."""
    kh, kw = w.shape[2:]
    h, wd = x.shape[1] + 2 * padding - kh + 1, x.shape[2] + 2 * padding - kw + 1
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    return sum(xp[:, i : i + h, j : j + wd, :] * w[:, 0, i, j] for i in range(kh) for j in range(kw))


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, statistics in float32 (as PyTorch computes them for f32/bf16 inputs)."""

    def __init__(
        self, dim: int, *, eps: float, axis_name: str = "norm", param_dtype, rngs: nnx.Rngs, bias: bool = True
    ):
        self.weight = param(rngs, ones, (dim,), (axis_name,), param_dtype)
        self.bias = param(rngs, zeros, (dim,), (axis_name,), param_dtype) if bias else None
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


class RMSNorm(nnx.Module):
    """RMSNorm in the two orders HF uses. ``offset=0`` (Llama): normalise in float32, cast to the input dtype,
    then scale by ``w``. ``offset=1`` (Gemma, whose ``w`` starts at 0): scale by ``1 + w`` in float32, then cast."""

    def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs, offset: float = 0.0):
        self.weight = param(rngs, zeros if offset else ones, (dim,), ("norm",), param_dtype)
        self.eps, self.offset = eps, offset

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), -1, keepdims=True) + self.eps)
        if self.offset:
            return (h * (self.offset + self.weight[...].astype(jnp.float32))).astype(dtype)
        return self.weight[...].astype(dtype) * h.astype(dtype)


class Embedding(nnx.Module):
    def __init__(self, num: int, dim: int, *, axes: tuple[str, str], param_dtype, rngs: nnx.Rngs, std: float = 0.02):
        self.weight = param(rngs, normal(std), (num, dim), axes, param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0)


class FeedForward(nnx.Module):
    """A ViT's MLP: ``fc2(act(fc1(x)))`` with biases (CLIP, InternViT)."""

    def __init__(self, dim: int, inner: int, *, act: str, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Linear(dim, inner, axes=("mlp", "embed"), **kw)
        self.fc2 = Linear(inner, dim, axes=("embed", "mlp"), **kw)
        self.act = activation(act)

    def __call__(self, x):
        return named(self.fc2(named(self.act(self.fc1(x)), "mlp_hidden")), "mlp_out")


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


# ---------------------------------------------------------------------------------------------------------------
# Stochastic depth
# ---------------------------------------------------------------------------------------------------------------


def drop_path(y: jax.Array, rate: jax.Array, key: jax.Array) -> jax.Array:
    """Stochastic depth (timm's): drop the residual branch ``y`` per sample with probability ``rate``, scaling
    survivors by 1 / (1 - rate). One Bernoulli draw per sample as floor(u + keep), so rate 0 keeps everything."""
    keep = 1.0 - rate
    mask = jnp.floor(jax.random.uniform(key, (y.shape[0],) + (1,) * (y.ndim - 1)) + keep) / keep
    return y * mask.astype(y.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Repeated layers: built stacked along a leading "layers" axis, applied with lax.scan under a remat policy
# ---------------------------------------------------------------------------------------------------------------

# Activations the layers name (``checkpoint_name``), which a policy may keep rather than recompute in the backward:
# attention's q/k/v (after rotary), its output (``context``, with a fused kernel's softmax statistics) and output
# projection, and the MLP's hidden activation (the down projection's input) and output.
ATTENTION_NAMES = ("query_proj", "key_proj", "value_proj", "context", "out_proj")
MLP_NAMES = ("mlp_hidden", "mlp_out")

_save = jax.checkpoint_policies.save_only_these_names
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # no rematerialisation: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # keep each layer's input only
    "save_qkv": _save(*ATTENTION_NAMES[:3]),
    "save_qkv_context": _save(*ATTENTION_NAMES[:4]),  # the backward does not rerun attention
    "save_dot_except_mlp": _save(*ATTENTION_NAMES),  # recompute the MLP only
    "minimal": _save(*ATTENTION_NAMES, *MLP_NAMES),  # recompute norms, rotary and activations only
    # the layers' inputs (all a "full" remat keeps) moved to the host's memory between forward and backward
    "full_offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(),
        names_which_can_be_offloaded=("layer_input",),
        offload_src="device",
        offload_dst="pinned_host",
    ),
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def named(x: jax.Array, name: str) -> jax.Array:
    """``x`` tagged for the remat policies (a no-op outside ``jax.checkpoint``)."""
    return checkpoint_name(x, name)


def stack(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs, axis: str = "layers") -> nnx.Module:
    """Build ``n`` copies of a module whose parameters are stacked on a new leading logical ``axis``
    (``layers`` for scanned layers, ``experts`` for a mixture of experts)."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: axis})
    def build(r):
        return make(r)

    return build(rngs)


@jax.tree_util.register_pytree_node_class
class PerLayer:
    """A stack held as one array per layer instead of one array with a leading layer axis (``unstack``)."""

    def __init__(self, items):
        self.items = tuple(items)

    def __getitem__(self, i):
        return self.items[i]

    def __len__(self):
        return len(self.items)

    def tree_flatten(self):
        return self.items, None

    @classmethod
    def tree_unflatten(cls, _, items):
        return cls(items)


def _stacked(v) -> bool:
    return isinstance(v, nnx.Variable) and (v.get_metadata().get("out_sharding") or (None,))[0] == "layers"


def unstack(model: nnx.Module) -> nnx.Module:
    """``model`` (in place) with every stack of scanned layers held as one array per layer (``PerLayer``), for
    decoding: a scanned layer's weights are sliced out of the stacked arrays at every step, which on a CPU copies
    them all per token, while separate arrays feed the matmuls as they are. ``scan`` then runs the layers as a
    Python loop (one compiled copy of each layer). Training and checkpoint conversion want the stacked form:
    ``restack`` returns to it."""
    for _, v in nnx.iter_graph(model):
        if _stacked(v) and not isinstance(v.get_value(), PerLayer):
            value = v.get_value()
            v.set_value(PerLayer(value[i] for i in range(value.shape[0])))
    return model


def is_unstacked(module: nnx.Module) -> bool:
    """Whether ``module``'s scanned layers are held ``PerLayer``."""
    return any(isinstance(v.get_value(), PerLayer) for _, v in nnx.iter_graph(module) if _stacked(v))


def restack(model: nnx.Module) -> nnx.Module:
    """``model`` (in place) with its ``unstack``-ed layers stacked again."""
    for _, v in nnx.iter_graph(model):
        if _stacked(v) and isinstance(v.get_value(), PerLayer):
            v.set_value(jnp.stack(v.get_value().items))
    return model


def scan(layers: nnx.Module, x, xs=None, *, remat: str = "none", unroll: int = 1, **shared):
    """Apply stacked ``layers`` in sequence: ``x, y_i = layer_i(x, xs_i, **shared)``; returns ``(x, ys)``.

    Per-layer inputs/outputs (a KV cache, drop-path rates) ride along as ``xs``/``ys`` with a leading layer
    axis; ``shared`` values (rotary tables, masks) are the same for every layer. Layers held ``PerLayer``
    (``unstack``) run as a loop, taking ``xs`` either way and giving ``ys`` as ``PerLayer`` leaves.
    """
    graphdef, state = nnx.split(layers)
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; known: {sorted(REMAT_POLICIES)}")

    def body(carry, inputs):
        layer_state, xi = inputs
        carry = jax.tree.map(lambda c: named(c, "layer_input"), carry)
        carry, y = nnx.merge(graphdef, layer_state)(carry, xi, **shared)
        return _batch_split(carry), y

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    per_layer = [v for v in jax.tree.leaves(state, is_leaf=_is_per_layer) if isinstance(v, PerLayer)]
    if not per_layer:
        return jax.lax.scan(body, _batch_split(x), (state, xs), unroll=unroll)
    carry, ys = _batch_split(x), []
    for i in range(len(per_layer[0])):
        carry, y = body(carry, jax.tree.map(lambda a: a[i], (state, xs), is_leaf=_is_per_layer))
        ys.append(y)
    return carry, jax.tree.map(lambda *a: PerLayer(a), *ys)


def _is_per_layer(x) -> bool:
    return isinstance(x, PerLayer)


def _batch_split(carry):
    """The residual stream split over the batch at every layer boundary (big_vision's ("act_batch", "act_len",
    "act_emb") constraint): the layers' weights are gathered to the rows, never the rows to the weights."""
    return jax.tree.map(lambda c: sharding.constrain(c, ("act_batch", "act_len", "act_embed")), carry)


def first_layers(layers: nnx.Module, n: int) -> nnx.Module:
    """The first ``n`` of stacked ``layers`` (a slice of the stacked weights: later layers are never run)."""
    graphdef, state = nnx.split(layers)
    return nnx.merge(graphdef, jax.tree.map(lambda p: p[:n], state))


def hidden_state_index(select_layer: int, n_layers: int) -> int:
    """HF ``hidden_states[select_layer]`` as a count of layers to run (index 0 = the embeddings)."""
    if not -(n_layers + 1) <= select_layer <= n_layers:
        raise ValueError(f"select_layer {select_layer} out of range for {n_layers} layers")
    return select_layer % (n_layers + 1)
