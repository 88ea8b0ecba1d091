"""One decoder for every Llama-shaped LLM: Llama-2 / Vicuna, Yi, Llama-3, Qwen2, Gemma, Mixtral, Phi-3, InternLM2.

The families differ only in a few switches on ``DecoderConfig`` (q/k/v biases, Gemma's ``(1 + w)`` RMSNorm and
scaled embeddings, activation, rotary scaling, a sliding window, a sparse MoE in place of the MLP), so the math is
written once. Parameter paths equal the HF Llama-style ``*ForCausalLM`` state-dict keys; families that store
tensors differently (Phi-3's fused ``qkv_proj``/``gate_up_proj``, InternLM2's names and per-KV-head packed
``wqkv``) convert through their key layout, so sharding rules see separate q/k/v everywhere. Layers are stacked on
a leading ``layers`` axis and run with ``lax.scan`` (compile time independent of depth), with a functional KV
cache for decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mgjax.convert.keymap import Fused, KeyLayout
from mgjax.models.base import ModelConfig, Pretrained, require
from mgjax.models.moe import SparseMoeBlock, load_balancing_loss
from mgjax.nn import attention, layers, rope
from mgjax.parallel import sharding


@dataclass(frozen=True, kw_only=True)
class DecoderConfig(ModelConfig):
    """``qkv_bias``: biases on q/k/v only (Qwen2); ``attention_bias``: on q/k/v/o (Llama's flag).
    ``norm_offset``: RMSNorm scales by ``offset + w`` in float32 before casting (Gemma: 1) instead of casting
    first and scaling by ``w`` (Llama: 0). ``scale_embeddings``: multiply the input sequence by sqrt(hidden)
    (Gemma) — applied to ``inputs_embeds`` too, since MGM scaled its spliced image+text sequence."""

    model_type: ClassVar[str]
    architecture: ClassVar[str]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope: rope.Rope = rope.Rope()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qkv_bias: bool = False
    mlp_bias: bool = False
    norm_offset: float = 0.0
    scale_embeddings: bool = False
    sliding_window: int | None = None  # each query sees only the last ``sliding_window`` positions (itself included)
    num_local_experts: int = 0  # > 0: a sparse MoE replaces the MLP (Mixtral)
    num_experts_per_tok: int = 2
    moe_impl: str = "auto"  # dense | grouped (ragged_dot) | megablox (Pallas, TPU) | auto: see models/moe.py
    output_router_logits: bool = False  # compute the router load-balancing loss (MGM trained without it)
    router_aux_loss_coef: float = 0.001

    @classmethod
    def family_fields(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        """What this family reads differently from a Llama config.json."""
        return {}

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], **overrides) -> "DecoderConfig":
        where = f"{cls.model_type} config"
        heads = require(d, "num_attention_heads", where)
        hidden = require(d, "hidden_size", where)
        kw = dict(
            vocab_size=require(d, "vocab_size", where),
            hidden_size=hidden,
            intermediate_size=require(d, "intermediate_size", where),
            num_hidden_layers=require(d, "num_hidden_layers", where),
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or hidden // heads,
            hidden_act=d.get("hidden_act", "silu"),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope=rope.Rope.from_hf(d),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=d.get("attention_bias", False),
            mlp_bias=d.get("mlp_bias", False),
            hf=dict(d),
        )
        kw.update(cls.family_fields(d))
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        d = {k: v for k, v in self.hf.items() if k not in ("rope_scaling", "rope_theta")}
        d.update(
            model_type=self.model_type,
            architectures=[self.architecture],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act=self.hidden_act,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=self.attention_bias,
            mlp_bias=self.mlp_bias,
            sliding_window=self.sliding_window,
            **self.rope.to_hf(),
        )
        return d


@dataclass(frozen=True, kw_only=True)
class LlamaConfig(DecoderConfig):
    model_type: ClassVar[str] = "llama"
    architecture: ClassVar[str] = "LlamaForCausalLM"


@dataclass(frozen=True, kw_only=True)
class Qwen2Config(DecoderConfig):
    model_type: ClassVar[str] = "qwen2"
    architecture: ClassVar[str] = "Qwen2ForCausalLM"
    qkv_bias: bool = True

    @classmethod
    def family_fields(cls, d):
        if d.get("use_sliding_window"):
            raise ValueError(
                "qwen2 config: use_sliding_window=true is not supported (sliding-window attention "
                "is not implemented; InternVL2's Qwen2 checkpoints do not use it)"
            )
        return {}


@dataclass(frozen=True, kw_only=True)
class MixtralConfig(DecoderConfig):
    model_type: ClassVar[str] = "mixtral"
    architecture: ClassVar[str] = "MixtralForCausalLM"
    num_local_experts: int = 8

    @classmethod
    def family_fields(cls, d):
        return {
            "num_local_experts": d.get("num_local_experts", 8),
            "num_experts_per_tok": d.get("num_experts_per_tok", 2),
            "sliding_window": d.get("sliding_window"),
            "output_router_logits": d.get("output_router_logits", False),
            "router_aux_loss_coef": d.get("router_aux_loss_coef", 0.001),
        }

    def to_hf(self):
        return {
            **super().to_hf(),
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "output_router_logits": self.output_router_logits,
            "router_aux_loss_coef": self.router_aux_loss_coef,
        }


@dataclass(frozen=True, kw_only=True)
class GemmaConfig(DecoderConfig):
    model_type: ClassVar[str] = "gemma"
    architecture: ClassVar[str] = "GemmaForCausalLM"
    hidden_act: str = "gelu_pytorch_tanh"
    norm_offset: float = 1.0
    scale_embeddings: bool = True
    tie_word_embeddings: bool = True

    @classmethod
    def family_fields(cls, d):
        # Gemma's released configs say "gelu" but mean the tanh approximation (transformers remaps it too).
        act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
        return {
            "hidden_act": "gelu_pytorch_tanh" if act == "gelu" else act,
            "tie_word_embeddings": d.get("tie_word_embeddings", True),
        }


@dataclass(frozen=True, kw_only=True)
class Phi3Config(DecoderConfig):
    """Phi-3 (Mini-InternVL-4B's LLM): LongRoPE, optional sliding window; fused tensors in the checkpoint."""

    model_type: ClassVar[str] = "phi3"
    architecture: ClassVar[str] = "Phi3ForCausalLM"
    rms_norm_eps: float = 1e-5

    @classmethod
    def family_fields(cls, d):
        return {"sliding_window": d.get("sliding_window")}

    def to_hf(self):
        d = super().to_hf()
        if self.rope.original_max_position_embeddings is not None:
            d["original_max_position_embeddings"] = self.rope.original_max_position_embeddings
        return d


@dataclass(frozen=True, kw_only=True)
class InternLM2Config(DecoderConfig):
    """InternLM2 (Mini-InternVL-2B's LLM; remote code on the Hub): Llama math, its own names, ``bias`` for all
    four attention projections, dynamic NTK rotary scaling past ``max_position_embeddings`` with the rescaled
    base computed in Python floats as its remote code does (``Rope.dynamic_base``)."""

    model_type: ClassVar[str] = "internlm2"
    architecture: ClassVar[str] = "InternLM2ForCausalLM"
    rms_norm_eps: float = 1e-5
    rope: rope.Rope = rope.Rope(dynamic_base="float64")  # as from_hf reads it: a config built in code runs the same

    @classmethod
    def family_fields(cls, d):
        return {"attention_bias": d.get("bias", False), "rope": rope.Rope.from_hf(d, dynamic_base="float64")}

    def to_hf(self):
        d = super().to_hf()
        d["bias"] = d.pop("attention_bias")
        return d


class DecoderOutput(NamedTuple):
    logits: jax.Array | None  # [B, T, V] float32; None when not asked for
    hidden: jax.Array  # [B, T, D] the final (normed) hidden states, the head's input
    cache: "KVCache | None"
    aux_loss: jax.Array | None  # router load-balancing loss (MoE with output_router_logits), else None


class KVCache(NamedTuple):
    """Keys/values of every layer, [L, B, S, KVH, D] (or ``layers.PerLayer`` of [B, S, KVH, D] for unstacked
    layers), and how many positions are filled."""

    k: jax.Array | layers.PerLayer
    v: jax.Array | layers.PerLayer
    index: jax.Array  # int32: a scalar, or [B] when each row fills its own positions (continuous batching)

    @classmethod
    def init(cls, config: DecoderConfig, batch: int, max_len: int, dtype=None, per_layer: bool = False) -> "KVCache":
        shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
        dtype = dtype or config.dtype
        n = config.num_hidden_layers
        if per_layer:
            k, v = (layers.PerLayer(jnp.zeros(shape, dtype) for _ in range(n)) for _ in "kv")
        else:
            k, v = jnp.zeros((n, *shape), dtype), jnp.zeros((n, *shape), dtype)
        return cls(k, v, jnp.zeros((), jnp.int32))

    @property
    def length(self) -> int:
        return self.k[0].shape[1]

    def rows(self, keep) -> "KVCache":
        """The cache of rows ``keep`` (beam search's reorder)."""
        axis = 0 if isinstance(self.k, layers.PerLayer) else 1
        take = lambda x: jnp.take(x, jnp.asarray(keep), axis=axis)  # noqa: E731
        return KVCache(jax.tree.map(take, self.k), jax.tree.map(take, self.v), self.index)


def _write(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """``new`` [B, T, ...] into ``cache`` [B, S, ...] at position ``index``: one for all rows, or each row's own."""
    new = new.astype(cache.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache, new, index, axis=1)
    return jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=0))(cache, new, index)


class Attention(nnx.Module):
    def __init__(self, c: DecoderConfig, rngs: nnx.Rngs):
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        qkv_bias = c.attention_bias or c.qkv_bias
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        self.q_proj = layers.Linear(c.hidden_size, q, axes=("heads", "embed"), bias=qkv_bias, **kw)
        self.k_proj = layers.Linear(c.hidden_size, kv, axes=("kv_heads", "embed"), bias=qkv_bias, **kw)
        self.v_proj = layers.Linear(c.hidden_size, kv, axes=("kv_heads", "embed"), bias=qkv_bias, **kw)
        self.o_proj = layers.Linear(q, c.hidden_size, axes=("embed", "heads"), bias=c.attention_bias, **kw)
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.impl = c.attention_impl

    def __call__(self, x, cos, sin, mask: attention.Mask, cache: tuple[jax.Array, jax.Array] | None, index):
        b, t, _ = x.shape

        def split(y, n, axis):
            return sharding.constrain(y.reshape(b, t, n, self.head_dim), ("act_batch", "act_len", axis))

        q = rope.apply(split(self.q_proj(x), self.heads, "act_heads"), cos, sin)
        k = rope.apply(split(self.k_proj(x), self.kv_heads, "act_kv_heads"), cos, sin)
        v = split(self.v_proj(x), self.kv_heads, "act_kv_heads")
        q, k, v = (layers.named(y, n) for y, n in zip((q, k, v), layers.ATTENTION_NAMES))
        if cache is not None:
            k, v = _write(cache[0], k, index), _write(cache[1], v, index)
            cache = (k, v)
        out = attention.attention(
            q, k.astype(q.dtype), v.astype(q.dtype), scale=self.head_dim**-0.5, mask=mask, impl=self.impl
        )
        return layers.named(self.o_proj(layers.named(out, "context").reshape(b, t, -1)), "out_proj"), cache


class MLP(nnx.Module):
    def __init__(self, c: DecoderConfig, rngs: nnx.Rngs):
        kw = dict(bias=c.mlp_bias, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.gate_proj = layers.Linear(c.hidden_size, c.intermediate_size, axes=("mlp", "embed"), **kw)
        self.up_proj = layers.Linear(c.hidden_size, c.intermediate_size, axes=("mlp", "embed"), **kw)
        self.down_proj = layers.Linear(c.intermediate_size, c.hidden_size, axes=("embed", "mlp"), **kw)
        self.act = layers.activation(c.hidden_act)

    def __call__(self, x):
        hidden = self.act(self.gate_proj(x)) * self.up_proj(x)
        hidden = layers.named(sharding.constrain(hidden, ("act_batch", "act_len", "act_mlp")), "mlp_hidden")
        return layers.named(self.down_proj(hidden), "mlp_out")


class DecoderLayer(nnx.Module):
    def __init__(self, c: DecoderConfig, rngs: nnx.Rngs):
        norm = dict(eps=c.rms_norm_eps, offset=c.norm_offset, param_dtype=c.param_dtype, rngs=rngs)
        self.input_layernorm = layers.RMSNorm(c.hidden_size, **norm)
        self.self_attn = Attention(c, rngs)
        self.post_attention_layernorm = layers.RMSNorm(c.hidden_size, **norm)
        self.is_moe = c.num_local_experts > 0
        if self.is_moe:
            self.block_sparse_moe = SparseMoeBlock(
                c.hidden_size,
                c.intermediate_size,
                c.num_local_experts,
                c.num_experts_per_tok,
                act=c.hidden_act,
                impl=c.moe_impl,
                dtype=c.dtype,
                param_dtype=c.param_dtype,
                rngs=rngs,
            )
        else:
            self.mlp = MLP(c, rngs)

    def __call__(self, x, cache, *, cos, sin, mask, index):
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, index)
        x = x + h
        h = self.post_attention_layernorm(x)
        h, router = self.block_sparse_moe(h) if self.is_moe else (self.mlp(h), None)
        return x + h, (cache, router)


class DecoderModel(nnx.Module):
    def __init__(self, c: DecoderConfig, rngs: nnx.Rngs):
        self.embed_tokens = layers.Embedding(
            c.vocab_size, c.hidden_size, axes=("vocab", "embed"), param_dtype=c.param_dtype, rngs=rngs
        )
        self.layers = layers.stack(lambda r: DecoderLayer(c, r), c.num_hidden_layers, rngs)
        self.norm = layers.RMSNorm(
            c.hidden_size, eps=c.rms_norm_eps, offset=c.norm_offset, param_dtype=c.param_dtype, rngs=rngs
        )
        self.config = c

    def __call__(self, embeds, positions, mask, cache: KVCache | None):
        c = self.config
        x = embeds.astype(c.dtype)
        if c.scale_embeddings:  # HF rounds the scale to the compute dtype before multiplying
            x = x * jnp.asarray(c.hidden_size**0.5, c.dtype)
        cos, sin = c.rope.cos_sin(positions, c.head_dim)
        index = cache.index if cache is not None else 0
        x, (kv, router) = layers.scan(
            self.layers,
            x,
            None if cache is None else (cache.k, cache.v),
            remat=c.remat,
            cos=cos,
            sin=sin,
            mask=mask,
            index=index,
        )
        if cache is not None:
            cache = KVCache(kv[0], kv[1], cache.index + embeds.shape[1])
        return self.norm(x), cache, router


ROTARY_BUFFERS = (r".*rotary_emb\.inv_freq",)


class CausalLM(nnx.Module, Pretrained):
    key_layouts = {"hf": KeyLayout(ignore=ROTARY_BUFFERS)}

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = DecoderModel(config, rngs)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else layers.Linear(
                config.hidden_size,
                config.vocab_size,
                axes=("vocab", "embed"),
                bias=False,
                dtype=config.dtype,
                param_dtype=config.param_dtype,
                rngs=rngs,
            )
        )

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings as stored (Gemma's sqrt(hidden) scale is applied to the whole input sequence later)."""
        return self.model.embed_tokens(input_ids).astype(self.config.dtype)

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        segment_ids: jax.Array | None = None,
        logits: bool = True,
    ) -> tuple[jax.Array, KVCache | None]:
        """Logits [B, T, V] (float32) and the updated cache; see ``forward``. ``logits=False``: the final hidden
        states [B, T, D] in their place, for a loss that applies ``head`` a chunk at a time."""
        out = self.forward(
            input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            positions=positions,
            cache=cache,
            segment_ids=segment_ids,
            logits=logits,
        )
        return (out.logits if logits else out.hidden), out.cache

    def head(self, h: jax.Array) -> jax.Array:
        """Logits of hidden states [..., D], in the compute dtype: the LM head, or the tied embeddings."""
        if self.lm_head is None:
            return jnp.einsum("...d,vd->...v", h, self.model.embed_tokens.weight[...].astype(h.dtype))
        return self.lm_head(h)

    def forward(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        segment_ids: jax.Array | None = None,
        logits: bool = True,
    ) -> DecoderOutput:
        """Logits, cache and (MoE with ``output_router_logits``, cache-free) the router load-balancing loss.

        ``attention_mask`` [B, S] marks real tokens (1) vs padding (0) over the whole key range (S = T without a
        cache, the cache length with one). With a cache, the T new tokens go at ``cache.index`` (each row at its own
        when the index is a vector).
        ``segment_ids`` [B, T] (packed samples, no cache): a token attends only within its own segment, and
        positions restart at 0 in each.
        """
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        start = 0 if cache is None else cache.index
        s = t if cache is None else cache.length
        if segment_ids is not None and cache is not None:
            raise ValueError("packed samples (segment_ids) are for training forwards, without a cache")
        if positions is None:
            positions = (
                segment_positions(segment_ids)
                if segment_ids is not None
                else jnp.broadcast_to(jnp.reshape(start, (-1, 1)) + jnp.arange(t, dtype=jnp.int32), (b, t))
            )
        mask = attention.Mask(
            causal=True,
            window=self.config.sliding_window,
            segment_ids=segment_ids,
            key_valid=attention_mask,
            offset=start,
        )
        h, cache, router = self.model(x, positions, mask, cache)
        h = sharding.constrain_batch(h)  # the head's FSDP weights are gathered, not the batch's logits
        out = sharding.constrain_batch(self.head(h)).astype(jnp.float32) if logits else None
        aux = None
        if router is not None and self.config.output_router_logits and s == t:  # a training forward, no cache
            aux = load_balancing_loss(router, self.config.num_experts_per_tok, attention_mask)
        return DecoderOutput(out, h, cache, aux)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache, per layer when the layers are (``layers.unstack``)."""
        return KVCache.init(self.config, batch, max_len, dtype, per_layer=layers.is_unstacked(self.model.layers))


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """[B, T] positions that restart at 0 wherever the segment id changes."""
    idx = jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def _qkv(suffix: str) -> tuple[str, ...]:
    return tuple(f"self_attn.{p}_proj.{suffix}" for p in "qkv")


PHI3 = KeyLayout(
    ignore=ROTARY_BUFFERS,
    fused=(
        Fused("self_attn.qkv_proj.weight", _qkv("weight")),
        Fused("mlp.gate_up_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    ),
)


def internlm2_layout(kv_heads: int) -> KeyLayout:
    """InternLM2's names; ``wqkv`` rows are ``[kv_heads, queries per kv head + 2, head_dim]``: each KV head's
    queries, then its key, then its value."""
    return KeyLayout(
        renames=(
            (r"\.embed_tokens\.", ".tok_embeddings."),
            (r"\.self_attn\.o_proj\.", ".attention.wo."),
            (r"\.mlp\.gate_proj\.", ".feed_forward.w1."),
            (r"\.mlp\.up_proj\.", ".feed_forward.w3."),
            (r"\.mlp\.down_proj\.", ".feed_forward.w2."),
            (r"\.input_layernorm\.", ".attention_norm."),
            (r"\.post_attention_layernorm\.", ".ffn_norm."),
            (r"^lm_head\.", "output."),
        ),
        fused=tuple(Fused(f"attention.wqkv.{s}", _qkv(s), groups=kv_heads) for s in ("weight", "bias")),
        ignore=ROTARY_BUFFERS,
    )


class LlamaForCausalLM(CausalLM):
    config_class = LlamaConfig


class Qwen2ForCausalLM(CausalLM):
    config_class = Qwen2Config


class GemmaForCausalLM(CausalLM):
    config_class = GemmaConfig


class MixtralForCausalLM(CausalLM):
    config_class = MixtralConfig


class Phi3ForCausalLM(CausalLM):
    config_class = Phi3Config
    key_layouts = {"hf": PHI3}


class InternLM2ForCausalLM(CausalLM):
    """Loads and writes InternLM2's own layout (``"internlm2"``); ``"hf"`` reads the split, Llama-named
    conversion of the same weights (transformers has no InternLM2; its InternVL converter writes that)."""

    config_class = InternLM2Config

    @classmethod
    def layouts(cls, config):
        return {"internlm2": internlm2_layout(config.num_key_value_heads), "hf": CausalLM.key_layouts["hf"]}
