"""Sparse mixture of experts (Mixtral): top-k routing as HF computes it, three interchangeable dispatch paths.

``dense`` runs every expert on every token and weights the results (exact and simple: the reference);
``grouped`` sorts the token-expert pairs by expert and runs each expert only on its own tokens with
``jax.lax.ragged_dot`` (top_k / num_experts of the dense FLOPs); ``megablox`` does the same sort with the Pallas
TPU grouped matmul (``jax.experimental.pallas.ops.tpu.megablox``; interpreted on CPUs), per batch shard, each
device running its own experts of the ``expert`` mesh axis on the tokens of its expert group. All give the same
outputs. ``auto`` takes megablox when compiling for a TPU and dense elsewhere, by measurement: on an H100
(jax 0.11.2) and on CPU XLA's ``ragged_dot`` runs 1.7-1.9x slower than dense dispatch despite 4x fewer FLOPs
(``bench/moe.py``), and XLA's TPU compiler lowers ``ragged_dot`` with buffers of every token times every expert
(MGM-8x7B stage 2: 95.5 GiB per v5p chip grouped, 50.1 GiB dense; docs/benchmarks.md).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from mgjax.kernels import precision
from mgjax.nn import layers
from mgjax.parallel import sharding, topology

# tokens [N, in] x expert weights [E, out, in] (torch layout, contracted in place rather than transposed per call)
TORCH_LAYOUT = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0]
)


class Expert(nnx.Module):
    def __init__(self, hidden: int, inner: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.w1 = layers.Linear(hidden, inner, axes=("mlp", "embed"), **kw)  # gate
        self.w2 = layers.Linear(inner, hidden, axes=("embed", "mlp"), **kw)  # down
        self.w3 = layers.Linear(hidden, inner, axes=("mlp", "embed"), **kw)  # up


class SparseMoeBlock(nnx.Module):
    """HF ``block_sparse_moe``: a router ``gate`` and ``experts`` stacked on a leading ``experts`` axis."""

    def __init__(
        self,
        hidden: int,
        inner: int,
        num_experts: int,
        top_k: int,
        *,
        act: str,
        impl: str,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        if impl not in IMPLS:
            raise ValueError(f"moe_impl must be one of {IMPLS}, not {impl!r}")
        self.gate = layers.Linear(
            hidden, num_experts, axes=(None, "embed"), bias=False, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs
        )
        self.experts = layers.stack(
            lambda r: Expert(hidden, inner, dtype=dtype, param_dtype=param_dtype, rngs=r),
            num_experts,
            rngs,
            axis="experts",
        )
        self.top_k, self.impl, self.act, self.dtype = top_k, impl, layers.activation(act), dtype

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Router logits [T, E] (float32), top-k weights [T, k] renormalised to sum to 1, expert ids [T, k]."""
        logits = self.gate(x.astype(jnp.float32))
        top, idx = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), self.top_k)
        return logits, top / top.sum(-1, keepdims=True), idx

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [B, T, D] -> (output [B, T, D], router logits [B*T, E])."""
        b, t, d = x.shape
        flat = x.reshape(b * t, d).astype(self.dtype)
        logits, weights, idx = self.route(flat)
        w1, w2, w3 = (getattr(self.experts, n).kernel() for n in ("w1", "w2", "w3"))
        impl = self.impl
        if impl == "auto":
            impl = "megablox" if topology.target().platform == "tpu" else "dense"
        run = {"dense": self._dense, "grouped": self._grouped, "megablox": self._megablox}[impl]
        out = run(flat, weights, idx, w1, w2, w3)
        return out.astype(x.dtype).reshape(b, t, d), logits

    def _dense(self, x, weights, idx, w1, w2, w3):
        h = self.act(jnp.einsum("td,eid->tei", x, w1)) * jnp.einsum("td,eid->tei", x, w3)
        y = jnp.einsum("tei,edi->ted", h, w2)
        combine = (
            jnp.zeros((x.shape[0], w1.shape[0]), jnp.float32).at[jnp.arange(x.shape[0])[:, None], idx].add(weights)
        )
        return jnp.einsum("ted,te->td", y.astype(jnp.float32), combine)

    def _grouped(self, x, weights, idx, w1, w2, w3):
        pairs = Pairs.sort(idx, w1.shape[0])
        xs = x[pairs.token]
        mm = lambda a, w: jax.lax.ragged_dot_general(a, w, pairs.sizes, TORCH_LAYOUT)  # noqa: E731
        return pairs.combine(mm(self.act(mm(xs, w1)) * mm(xs, w3), w2), weights)

    def _megablox(self, x, weights, idx, w1, w2, w3):
        interpret = topology.target().platform != "tpu"
        local = partial(_megablox_local, act=self.act, interpret=interpret)
        mesh = jax.sharding.get_abstract_mesh()
        rows = sharding.traced_batch_axes(x.shape[0])
        if not rows:
            return local(x, weights, idx, w1, w2, w3, expert_axis=None)
        ep = "expert" if "expert" in rows and w1.shape[0] % mesh.shape["expert"] == 0 else None
        tokens, experts = PartitionSpec(rows), PartitionSpec(ep)
        return jax.shard_map(
            partial(local, expert_axis=ep),
            in_specs=(tokens, tokens, tokens, experts, experts, experts),
            out_specs=tokens,
            check_vma=False,
        )(x, weights, idx, w1, w2, w3)


IMPLS = ("auto", "dense", "grouped", "megablox")


class Pairs(NamedTuple):
    """The token-expert pairs of top-k routing sorted by expert, as the grouped dispatches run them."""

    order: jax.Array  # [T * k] the pairs' flat (token, slot) indices, grouped by expert
    token: jax.Array  # [T * k] each sorted pair's token
    expert: jax.Array  # [T * k] each sorted pair's expert
    sizes: jax.Array  # [E] int32 pairs per expert

    @classmethod
    def sort(cls, idx: jax.Array, num_experts: int) -> "Pairs":
        experts = idx.reshape(-1)
        order = jnp.argsort(experts, stable=True)
        sizes = jnp.bincount(experts, length=num_experts).astype(jnp.int32)
        return cls(order, order // idx.shape[1], experts[order], sizes)

    def combine(self, y: jax.Array, weights: jax.Array) -> jax.Array:
        """The sorted pairs' outputs ``y`` weighted by their routing ``weights`` [T, k], summed per token (float32)."""
        y = y.astype(jnp.float32) * weights.reshape(-1)[self.order][:, None]
        return jnp.zeros((weights.shape[0], y.shape[1]), jnp.float32).at[self.token].add(y)


GMM_TILE = 512  # rows, contraction and output columns per megablox tile (fewer where a dimension is smaller)


def _megablox_local(x, weights, idx, w1, w2, w3, *, act, interpret, expert_axis):
    """One device's share: its tokens ``x`` [T, D] (with routing ``weights``/``idx`` [T, k]) and its experts
    ``w*`` [E_local, out, in]. With an ``expert_axis``, the tokens of the devices along it are gathered, each device
    runs its own experts on the pairs routed to them, and the partial outputs are summed back to their devices."""
    from jax.experimental.pallas.ops.tpu.megablox import ops  # noqa: PLC0415 (TPU kernels)

    if expert_axis is not None:
        x, weights, idx = (jax.lax.all_gather(a, expert_axis, tiled=True) for a in (x, weights, idx))
    local_e = w1.shape[0]
    first = 0 if expert_axis is None else jax.lax.axis_index(expert_axis) * local_e
    total_e = local_e if expert_axis is None else local_e * jax.lax.axis_size(expert_axis)
    pairs = Pairs.sort(idx, total_e)
    m = pairs.token.shape[0]
    tm = min(GMM_TILE, -(-m // 8) * 8)
    rows = jnp.pad(x[pairs.token], ((0, -m % tm), (0, 0)))
    offset = jnp.asarray(first, jnp.int32)

    def mm(a, w):
        tiles = (tm, _tile(a.shape[1]), _tile(w.shape[1]))
        gmm = precision.default_for_bfloat16(
            lambda a, w, sizes, offset: ops.gmm(a, w, sizes, a.dtype, tiles, offset, None, True, interpret)
        )
        return gmm(a, w, pairs.sizes, offset)

    y = mm(act(mm(rows, w1)) * mm(rows, w3), w2)[:m]
    mine = (pairs.expert >= first) & (pairs.expert < first + local_e)  # rows of other devices' experts: unset
    out = pairs.combine(jnp.where(mine[:, None], y, 0), weights)
    if expert_axis is not None:
        out = jax.lax.psum_scatter(out, expert_axis, scatter_dimension=0, tiled=True)
    return out


def _tile(n: int) -> int:
    """The largest tile up to GMM_TILE that divides ``n`` in 128s, else ``n`` whole (a small test dimension)."""
    return next((s for s in (GMM_TILE, 256, 128) if n % s == 0), n)


def load_balancing_loss(router_logits: jax.Array, top_k: int, mask: jax.Array | None = None) -> jax.Array:
    """The Switch-Transformer auxiliary loss as transformers' Mixtral computes it: ``E * sum_e f_e * P_e`` over
    all layers' tokens, with ``f_e`` the top-k assignments to expert e per token and ``P_e`` its mean router
    probability. ``router_logits`` [L, N, E]; ``mask`` [N] (1 = real token) leaves padding out of both means."""
    n_layers, n, e = router_logits.shape
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    _, idx = jax.lax.top_k(probs, top_k)
    m = jnp.ones((n,), jnp.float32) if mask is None else mask.reshape(n).astype(jnp.float32)
    counts = jnp.einsum("lnke,n->e", jax.nn.one_hot(idx, e, dtype=jnp.float32), m)
    prob = jnp.einsum("lne,n->e", probs, m)
    rows = n_layers * m.sum()
    return e * jnp.sum((counts / rows) * (prob / rows))
