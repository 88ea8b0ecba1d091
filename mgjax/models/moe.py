"""Sparse mixture of experts (Mixtral): top-k routing as HF computes it, two interchangeable dispatch paths.

``dense`` runs every expert on every token and weights the results (exact and simple: the reference);
``grouped`` sorts the token-expert pairs by expert and runs each expert only on its own tokens with
``jax.lax.ragged_dot`` (top_k / num_experts of the dense FLOPs). Both give the same outputs. ``auto`` takes
dense on every platform, by measurement: on an H100 (jax 0.11.2) and on CPU XLA's ``ragged_dot`` runs 1.7-1.9x
slower than dense dispatch despite 4x fewer FLOPs (``bench/moe.py``), and XLA's TPU compiler lowers it with
buffers of every token times every expert (``bf16[tokens x experts, mlp]``): MGM-8x7B stage 2 compiled deviceless
needs 95.5 GiB per v5p chip at 4 rows per chip grouped, 50.1 GiB dense, and on v5e fits no slice grouped
(docs/benchmarks.md). A grouped-matmul kernel (megablox) is what would make grouped worth it on TPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mgjax.nn import layers

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
        if impl not in ("auto", "dense", "grouped"):
            raise ValueError(f"moe_impl must be 'auto', 'dense' or 'grouped', not {impl!r}")
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
        w1, w2, w3 = (getattr(self.experts, n).weight[...].astype(self.dtype) for n in ("w1", "w2", "w3"))
        impl = "dense" if self.impl == "auto" else self.impl
        out = (self._dense if impl == "dense" else self._grouped)(flat, weights, idx, w1, w2, w3)
        return out.astype(x.dtype).reshape(b, t, d), logits

    def _dense(self, x, weights, idx, w1, w2, w3):
        h = self.act(jnp.einsum("td,eid->tei", x, w1)) * jnp.einsum("td,eid->tei", x, w3)
        y = jnp.einsum("tei,edi->ted", h, w2)
        combine = (
            jnp.zeros((x.shape[0], w1.shape[0]), jnp.float32).at[jnp.arange(x.shape[0])[:, None], idx].add(weights)
        )
        return jnp.einsum("ted,te->td", y.astype(jnp.float32), combine)

    def _grouped(self, x, weights, idx, w1, w2, w3):
        t, k = idx.shape
        experts = idx.reshape(-1)
        order = jnp.argsort(experts, stable=True)  # token-expert pairs, grouped by expert
        token = order // k
        sizes = jnp.bincount(experts, length=w1.shape[0]).astype(jnp.int32)
        xs = x[token]
        mm = lambda a, w: jax.lax.ragged_dot_general(a, w, sizes, TORCH_LAYOUT)  # noqa: E731
        y = mm(self.act(mm(xs, w1)) * mm(xs, w3), w2)
        y = y.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
        return jnp.zeros((t, x.shape[1]), jnp.float32).at[token].add(y)


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
