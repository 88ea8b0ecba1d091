"""Rotary position embeddings in HF's half-split layout, with the scalings our decoders use.

Frequencies follow transformers' float32 arithmetic operation by operation (``scalar / tensor`` is a reciprocal
times the scalar, Python scalars are rounded to float32 before they meet a tensor), so the tables equal the
``inv_freq`` buffers of transformers' rotary modules bit for bit. The one operation PyTorch does not specify is
``pow``: its CPU kernels disagree with each other (the scalar kernel, glibc's ``powf``, and the AVX2 / AVX-512
kernels, SLEEF's ``powf``, differ in 1 ulp on a few entries of some tables: Gemma-2B's, Yi-34B's, Mixtral's and
Phi-3's among the releases). We round the exact power once (float64 ``pow``, then float32), which is what
PyTorch's scalar kernel gives for every released table; ``docs/fidelity.md`` has the measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED = ("default", "linear", "llama3", "dynamic", "longrope")
f32 = np.float32


def _pow(base, exponent) -> np.ndarray:
    """float32 ``base ** exponent`` rounded once from the float64 power (a correctly rounded powf in all but
    astronomically rare cases)."""
    return (np.float64(base) ** np.asarray(exponent, np.float64)).astype(f32)


def _exponents(head_dim: int) -> np.ndarray:
    """transformers' ``arange(0, dim, 2).float() / dim``, in float32."""
    return np.arange(0, head_dim, 2).astype(f32) / f32(head_dim)


def _reciprocal(x) -> np.ndarray:
    return (f32(1) / np.asarray(x, f32)).astype(f32)


@dataclass(frozen=True)
class Rope:
    """``dynamic`` (NTK: InternLM2, transformers' ``dynamic``) and ``longrope`` (Phi-3) depend on the sequence:
    each forward picks its frequencies from the largest position it sees, ``max(positions) + 1``, as transformers
    does for a fresh module, but per row: transformers takes the batch's largest, so that one long row switches
    every row of a left-padded batch; mgjax gives each row the frequencies it would get alone (a deliberate
    deviation: continuous batching puts unrelated requests in one batch, and each must decode as it would alone).
    transformers' and InternLM2's modules also remember the longest sequence seen and keep its frequencies for
    shorter ones that follow; mgjax has no such state, which only matters when a second, shorter sequence past the
    original window reuses a module.

    ``dynamic_base``: how the rescaled NTK base is computed — ``"float32"`` as transformers' tensor operations do,
    ``"float64"`` as InternLM2's remote code does in Python floats before rounding it to float32."""

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
    dynamic_base: str = "float32"

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], **fields) -> "Rope":
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
        return cls(
            theta=float(p["rope_theta"]),
            type=kind,
            factor=float(factor or 1.0),
            low_freq_factor=float(p.get("low_freq_factor", 1.0)),
            high_freq_factor=float(p.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=original,
            max_position_embeddings=d.get("max_position_embeddings") if kind == "dynamic" else None,
            short_factor=tuple(p.get("short_factor", ())),
            long_factor=tuple(p.get("long_factor", ())),
            attention_factor=p.get("attention_factor"),
            **fields,
        )

    def to_hf(self) -> dict[str, Any]:
        p: dict[str, Any] = {"rope_type": self.type, "rope_theta": self.theta}
        if self.type != "default":
            p["factor"] = self.factor
        if self.type == "llama3":
            p.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        if self.type == "longrope":
            p.update(
                short_factor=list(self.short_factor),
                long_factor=list(self.long_factor),
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
            if self.attention_factor is not None:
                p["attention_factor"] = self.attention_factor
        return {"rope_parameters": p}

    def base_inv_freq(self, head_dim: int) -> np.ndarray:
        """``1 / theta ** (2i / dim)``: the unscaled table (float32)."""
        return _reciprocal(_pow(f32(self.theta), _exponents(head_dim)))

    def inv_freq(self, head_dim: int, seq_len: int | None = None) -> np.ndarray:
        """The float32 frequencies transformers' rotary module holds after a forward whose largest position is
        ``seq_len - 1`` (None: as built, before any forward)."""
        inv = self.base_inv_freq(head_dim)
        if self.type == "linear":
            return (inv / f32(self.factor)).astype(f32)
        if self.type == "llama3":
            return self._llama3(inv)
        if self.type == "longrope":
            return self._longrope(head_dim, seq_len is not None and seq_len > self.original_max_position_embeddings)
        if self.type == "dynamic" and seq_len is not None and seq_len > self.max_position_embeddings:
            return np.asarray(self._dynamic(head_dim, seq_len))
        return inv

    def _llama3(self, inv: np.ndarray) -> np.ndarray:
        old = self.original_max_position_embeddings
        low_wavelen, high_wavelen = f32(old / self.low_freq_factor), f32(old / self.high_freq_factor)
        wavelen = _reciprocal(inv) * f32(2 * math.pi)
        factor = f32(self.factor)
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (_reciprocal(wavelen) * f32(old) - f32(self.low_freq_factor)) / f32(
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (f32(1) - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(f32)

    def _longrope(self, head_dim: int, long: bool) -> np.ndarray:
        factors = np.asarray(self.long_factor if long else self.short_factor, f32)
        return _reciprocal(factors * _pow(f32(self.theta), _exponents(head_dim)))

    def longrope_scale(self) -> float:
        if self.attention_factor is not None:
            return self.attention_factor
        if self.factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_position_embeddings))

    def _dynamic(self, head_dim: int, seq_len) -> jax.Array:
        """NTK-rescaled frequencies for ``seq_len`` (a traced int past ``max_position_embeddings``).

        Runs in float64 inside the program, rounding to float32 wherever the reference holds a float32 tensor, so
        the powers are rounded once, as ``_pow`` does on the host."""
        limit, factor, exponent = self.max_position_embeddings, self.factor, head_dim / (head_dim - 2)
        with jax.enable_x64(True):
            s = jnp.asarray(seq_len).astype(jnp.float64)
            r32 = lambda x: x.astype(jnp.float32).astype(jnp.float64)  # noqa: E731
            if self.dynamic_base == "float64":  # InternLM2: Python floats, rounded to float32 at the tensor
                base = r32(self.theta * (factor * s / limit - (factor - 1)) ** exponent)
            else:  # transformers: float32 tensor operations on the int64 sequence length
                ratio = r32(r32(r32(f32(factor) * s) / f32(limit)) - f32(factor - 1))
                base = r32(f32(self.theta) * r32(ratio**exponent))  # tensor ** float: a float64 pow
            power = r32(base ** _exponents(head_dim).astype(np.float64))
            return (1.0 / power).astype(jnp.float32)

    def cos_sin(self, positions: jax.Array, head_dim: int) -> tuple[jax.Array, jax.Array]:
        """cos/sin tables [B, T, head_dim] (float32) for integer ``positions`` [B, T]."""
        scale = 1.0
        # each row's own longest position, [B, 1, 1]: a row of a batch gets the frequencies it gets alone
        seq_len = jnp.max(positions, axis=-1, keepdims=True)[..., None] + 1
        if self.type == "longrope":
            long = seq_len > self.original_max_position_embeddings
            inv = jnp.where(long, self._longrope(head_dim, True), self._longrope(head_dim, False))
            scale = self.longrope_scale()
        elif self.type == "dynamic":
            inv = jnp.where(
                seq_len > self.max_position_embeddings, self._dynamic(head_dim, seq_len), self.base_inv_freq(head_dim)
            )
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
