"""Rotary position embeddings in HF's half-split layout, with the scalings our decoders use."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class Rope:
    theta: float = 10000.0
    type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "Rope":
        """Read transformers 5 ``rope_parameters`` or the older ``rope_theta`` + ``rope_scaling`` pair."""
        p = dict(d.get("rope_parameters") or {})
        if not p:
            p = dict(d.get("rope_scaling") or {})
            p.setdefault("rope_theta", d.get("rope_theta", 10000.0))
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in ("default", "linear", "llama3"):
            raise ValueError(f"rope_type {kind!r} is not supported (default, linear, llama3)")
        return cls(theta=float(p["rope_theta"]), type=kind, factor=float(p.get("factor", 1.0)),
                   low_freq_factor=float(p.get("low_freq_factor", 1.0)),
                   high_freq_factor=float(p.get("high_freq_factor", 4.0)),
                   original_max_position_embeddings=p.get("original_max_position_embeddings"))

    def to_hf(self) -> dict[str, Any]:
        p: dict[str, Any] = {"rope_type": self.type, "rope_theta": self.theta}
        if self.type in ("linear", "llama3"):
            p["factor"] = self.factor
        if self.type == "llama3":
            p.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
                     original_max_position_embeddings=self.original_max_position_embeddings)
        return {"rope_parameters": p}

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Float32 inverse frequencies, computed the way transformers computes them."""
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

    def cos_sin(self, positions: jax.Array, head_dim: int) -> tuple[jax.Array, jax.Array]:
        """cos/sin tables [B, T, head_dim] (float32) for integer ``positions`` [B, T]."""
        freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(self.inv_freq(head_dim))
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` [B, T, H, D] by cos/sin [B, T, D], in x's dtype as HF does."""
    cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
    return x * cos + rotate_half(x) * sin
