"""Rotary position embeddings in HF's half-split layout, with the scalings our decoders use."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


SUPPORTED = ("default", "linear", "llama3", "dynamic", "longrope")


@dataclass(frozen=True)
class Rope:
    """``dynamic`` (NTK, InternLM2) and ``longrope`` (Phi-3) depend on the sequence: like transformers, each forward
    picks its frequencies from the largest position it sees, ``max(positions) + 1``."""
    theta: float = 10000.0
    type: str = "default"  # one of SUPPORTED
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    max_position_embeddings: int | None = None  # dynamic: where the rescaling starts
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float | None = None

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "Rope":
        """Read transformers 5 ``rope_parameters`` or the older ``rope_theta`` + ``rope_scaling`` pair from a whole
        model config (some fields, like Phi-3's ``original_max_position_embeddings``, live at its top level)."""
        p = dict(d.get("rope_parameters") or {})
        if not p:
            p = dict(d.get("rope_scaling") or {})
            p.setdefault("rope_theta", d.get("rope_theta", 10000.0))
        kind = p.get("rope_type", p.get("type", "default"))
        kind = "longrope" if kind == "su" else kind  # LongRoPE's name in the first Phi-3 configs
        if kind not in SUPPORTED:
            raise ValueError(f"rope_type {kind!r} is not supported ({', '.join(SUPPORTED)})")
        if p.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported (rotary embeddings on the whole head)")
        original = d.get("original_max_position_embeddings") or p.get("original_max_position_embeddings")
        factor = p.get("factor")
        if kind == "longrope" and factor is None:
            factor = d["max_position_embeddings"] / original
        return cls(theta=float(p["rope_theta"]), type=kind, factor=float(factor or 1.0),
                   low_freq_factor=float(p.get("low_freq_factor", 1.0)),
                   high_freq_factor=float(p.get("high_freq_factor", 4.0)),
                   original_max_position_embeddings=original,
                   max_position_embeddings=d.get("max_position_embeddings") if kind == "dynamic" else None,
                   short_factor=tuple(p.get("short_factor", ())), long_factor=tuple(p.get("long_factor", ())),
                   attention_factor=p.get("attention_factor"))

    def to_hf(self) -> dict[str, Any]:
        p: dict[str, Any] = {"rope_type": self.type, "rope_theta": self.theta}
        if self.type != "default":
            p["factor"] = self.factor
        if self.type == "llama3":
            p.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
                     original_max_position_embeddings=self.original_max_position_embeddings)
        if self.type == "longrope":
            p.update(short_factor=list(self.short_factor), long_factor=list(self.long_factor),
                     original_max_position_embeddings=self.original_max_position_embeddings)
            if self.attention_factor is not None:
                p["attention_factor"] = self.attention_factor
        return {"rope_parameters": p}

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Float32 inverse frequencies of the sequence-independent types, computed as transformers does."""
        inv = (1.0 / (np.float32(self.theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
               ).astype(np.float32)
        if self.type == "linear":
            return (inv / np.float32(self.factor)).astype(np.float32)
        if self.type == "llama3":
            return self._llama3(inv)
        return inv

    def _llama3(self, inv: np.ndarray) -> np.ndarray:
        old = self.original_max_position_embeddings
        low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
        smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)

    def _longrope(self, head_dim: int, seq_len: jax.Array) -> tuple[jax.Array, float]:
        exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
        base = np.float32(self.theta) ** exponent
        short = (1.0 / (np.asarray(self.short_factor, np.float32) * base)).astype(np.float32)
        long = (1.0 / (np.asarray(self.long_factor, np.float32) * base)).astype(np.float32)
        scale = self.attention_factor
        if scale is None:
            old = self.original_max_position_embeddings
            scale = 1.0 if self.factor <= 1.0 else math.sqrt(1 + math.log(self.factor) / math.log(old))
        return jnp.where(seq_len > self.original_max_position_embeddings, long, short), scale

    def _dynamic(self, head_dim: int, seq_len: jax.Array) -> jax.Array:
        limit = self.max_position_embeddings
        seq = jnp.maximum(seq_len, limit).astype(jnp.float32)
        base = self.theta * ((self.factor * seq / limit) - (self.factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)

    def cos_sin(self, positions: jax.Array, head_dim: int) -> tuple[jax.Array, jax.Array]:
        """cos/sin tables [B, T, head_dim] (float32) for integer ``positions`` [B, T]."""
        scale = 1.0
        if self.type == "longrope":
            inv, scale = self._longrope(head_dim, jnp.max(positions) + 1)
        elif self.type == "dynamic":
            inv = self._dynamic(head_dim, jnp.max(positions) + 1)
        else:
            inv = jnp.asarray(self.inv_freq(head_dim))
        freqs = positions.astype(jnp.float32)[..., None] * inv
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` [B, T, H, D] by cos/sin [B, T, D], in x's dtype as HF does."""
    cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
    return x * cos + rotate_half(x) * sin
