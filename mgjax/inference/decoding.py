"""Decoding with a KV cache: greedy, temperature / top-k / top-p sampling and beam search over batches of prompts
of different lengths (left-padded), streamed one step at a time.

Shapes are static: a batch is padded on the left to a bucket length and the cache holds the bucket plus the new
tokens, so one compiled prefill and one compiled step serve every batch of that (rows, bucket, budget); each takes
the model's (hashable) graphdef and the ``Sampling`` as static arguments. Padding is masked out of every attention
and positions count real tokens only, so a row decodes as it would alone (up to float summation order).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclass(frozen=True)
class Sampling:
    """How each next token is chosen. ``temperature`` 0: the argmax (greedy). Otherwise a draw from
    softmax(logits / temperature) restricted to the ``top_k`` likeliest tokens (0: all) and then to the smallest
    set whose probability reaches ``top_p``, transformers' order of warpers. ``num_beams`` > 1: beam search
    (``beam_search``), sampled within the beams when ``temperature`` > 0, as MGM scores MMMU."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.num_beams < 1:
            raise ValueError(
                f"bad sampling settings {self}: temperature >= 0, top_k >= 0, 0 < top_p <= 1, num_beams >= 1"
            )


def _kth_largest(x: jax.Array, k) -> jax.Array:
    """The ``k``-th largest of ``x`` [..., V] along its last axis, kept as [..., 1]."""
    if isinstance(k, int):
        return jax.lax.top_k(x, min(k, x.shape[-1]))[0][..., -1:]
    return jnp.take(jnp.sort(x, axis=-1)[..., ::-1], jnp.maximum(k - 1, 0), axis=-1)[..., None]


def _cuts(value, none) -> bool:
    """Whether a setting may cut anything: a traced one may, a number unless it is ``none``."""
    return isinstance(value, jax.Array) or value != none


def _keep_top(x: jax.Array, top_k, top_p) -> jax.Array:
    """``x`` [..., V] with everything outside the top-k, then outside the top-p mass of softmax(x), set to -inf.
    ``top_k`` / ``top_p``: numbers (a cut of nothing, 0 / 1, is skipped), or one row's traced settings (under
    ``vmap``: continuous batching's rows, each with its own)."""
    if _cuts(top_k, 0):
        x = jnp.where((top_k > 0) & (x < _kth_largest(x, top_k)), -jnp.inf, x)
    if _cuts(top_p, 1.0):
        ordered = jnp.sort(x, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # the mass strictly above each token: keep while < top_p
        cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where((top_p < 1.0) & (x < cutoff), -jnp.inf, x)
    return x


def warp(logits: jax.Array, s: Sampling) -> jax.Array:
    """Log-probabilities [..., V] of the next token after temperature, top-k and top-p (excluded tokens -inf)."""
    return jax.nn.log_softmax(_keep_top(logits.astype(jnp.float32) / s.temperature, s.top_k, s.top_p), axis=-1)


def choose(logits: jax.Array, s: Sampling, key: jax.Array) -> jax.Array:
    """The next token [B] from the last position's logits [B, V]."""
    if s.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, warp(logits, s), axis=-1).astype(jnp.int32)


def choose_rows(logits: jax.Array, temperature, top_k, top_p, keys) -> jax.Array:
    """``choose`` with each row's own settings [B] (continuous batching: one batch, many requests). A row takes
    exactly the token ``choose`` gives it alone with ``Sampling(temperature, top_k, top_p)`` and its key."""

    def one(row, t, k, p, key):
        x = _keep_top(row.astype(jnp.float32) / jnp.where(t > 0, t, 1.0), k, p)
        drawn = jax.random.categorical(key, jax.nn.log_softmax(x)[None], axis=-1)[0]  # [1, V]: as ``choose`` alone
        return jnp.where(t > 0, drawn, jnp.argmax(row)).astype(jnp.int32)

    return jax.vmap(one)(logits, temperature, top_k, top_p, keys)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, bucket: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [B, L] padded on the left with ``pad_id`` and their mask (1 = real). L is the longest prompt
    rounded up to a multiple of ``bucket``, so that batches of similar lengths share one compiled shape."""
    length = -(-max(len(p) for p in prompts) // bucket) * bucket
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, -len(p) :], mask[i, -len(p) :] = p, 1
    return ids, mask


def _positions(mask: jax.Array, upto: jax.Array | int) -> jax.Array:
    """Each row's count of real tokens before ``upto`` (one index, or [B]): the position of a token placed there."""
    before = jnp.arange(mask.shape[1])[None, :] < jnp.reshape(upto, (-1, 1))
    return jnp.sum(jnp.where(before, mask, 0), axis=1).astype(jnp.int32)


def _forward(model, ids, embeds, mask, cache):
    """The prompt (or a re-encoded sequence) through the model into ``cache``; the last position's logits."""
    embeds = model.embed(ids) if embeds is None else embeds
    t = embeds.shape[1]
    positions = jnp.maximum(jnp.cumsum(mask[:, :t], axis=1) - 1, 0).astype(jnp.int32)
    logits, cache = model(inputs_embeds=embeds, attention_mask=mask, positions=positions, cache=cache)
    return logits[:, -1], cache


@partial(jax.jit, static_argnums=(0, 5, 6))
def _prefill(graphdef, state, ids, embeds, mask, max_len, sampling, key):
    model = nnx.merge(graphdef, state)
    logits, cache = _forward(model, ids, embeds, mask, model.init_cache(ids.shape[0], max_len))
    return choose(logits, sampling, key), cache


@partial(jax.jit, static_argnums=(0, 5), donate_argnums=3)  # the cache is updated in place
def _step(graphdef, state, token, cache, mask, sampling, key):
    positions = _positions(mask, cache.index)[:, None]
    logits, cache = nnx.merge(graphdef, state)(token[:, None], attention_mask=mask, positions=positions, cache=cache)
    return choose(logits[:, -1], sampling, key), cache


def reencode_length(config) -> int | None:
    """The sequence length at which cached keys go stale. LongRoPE (Phi-3) rotates *every* position with its long
    factors once a forward sees more than the original context, so keys cached under the short factors must be
    recomputed; transformers' ``generate`` re-encodes the whole sequence at that point, and so do we."""
    rope = getattr(config, "rope", None)
    if rope is not None and rope.type == "longrope":
        return rope.original_max_position_embeddings + 1
    return None


def _mask(attention_mask, input_ids, max_new_tokens: int) -> jax.Array:
    """The mask over the cache: the prompt's, then every generated position real."""
    b, t = input_ids.shape
    prompt = jnp.ones((b, t), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    return jnp.concatenate([prompt, jnp.ones((b, max_new_tokens), jnp.int32)], axis=1)


def stream(
    model: nnx.Module,
    input_ids: jax.Array,
    max_new_tokens: int,
    *,
    attention_mask: jax.Array | None = None,
    inputs_embeds: jax.Array | None = None,
    sampling: Sampling = Sampling(),
    stop_ids: Sequence[int] = (),
) -> Iterator[np.ndarray]:
    """Each step's new tokens [B] for ``input_ids`` [B, T] (left-padded, ``attention_mask`` 1 on real tokens),
    until ``max_new_tokens`` or until every row has produced one of ``stop_ids`` (a row that stopped keeps
    decoding until then; callers cut at its first stop). ``model`` is a causal LM; ``inputs_embeds`` [B, T, D]
    replaces the prompt's embeddings (a VLM's ``embed`` output, images merged)."""
    if sampling.num_beams > 1:
        raise ValueError("num_beams > 1 decodes whole sequences: use beam_search")
    graphdef, state = nnx.split(model)
    t = input_ids.shape[1]
    max_len = t + max_new_tokens
    mask = _mask(attention_mask, input_ids, max_new_tokens)
    keys = iter(jax.random.split(jax.random.key(sampling.seed), max_new_tokens))
    token, cache = _prefill(graphdef, state, input_ids, inputs_embeds, mask, max_len, sampling, next(keys))
    out = [token]
    yield np.asarray(token)
    done = np.isin(np.asarray(token), stop_ids)
    restart = reencode_length(model.config)
    while len(out) < max_new_tokens and not done.all():
        if t + len(out) == restart:
            new = jnp.stack(out, 1)
            embeds = None if inputs_embeds is None else jnp.concatenate([inputs_embeds, model.embed(new)], 1)
            token, cache = _prefill(
                graphdef, state, jnp.concatenate([input_ids, new], 1), embeds, mask, max_len, sampling, next(keys)
            )
        else:
            token, cache = _step(graphdef, state, token, cache, mask, sampling, next(keys))
        out.append(token)
        yield np.asarray(token)
        done |= np.isin(np.asarray(token), stop_ids)


def generate(model: nnx.Module, input_ids: jax.Array, max_new_tokens: int, **kw) -> jax.Array:
    """``input_ids`` [B, T] with the tokens ``stream`` (same keywords) produces appended: [B, T + steps]."""
    steps = list(stream(model, input_ids, max_new_tokens, **kw))
    return jnp.concatenate([jnp.asarray(input_ids), jnp.asarray(np.stack(steps, axis=1))], axis=1)


def greedy(
    model: nnx.Module,
    input_ids: jax.Array,
    max_new_tokens: int,
    *,
    inputs_embeds: jax.Array | None = None,
    stop_ids: Sequence[int] = (),
) -> jax.Array:
    """``generate`` with argmax tokens and no padding."""
    return generate(model, input_ids, max_new_tokens, inputs_embeds=inputs_embeds, stop_ids=stop_ids)


def cut(tokens: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """A row's tokens before its first stop token."""
    tokens = list(tokens)
    return tokens[: next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))]


# ------------------------------------------------------------------------------------------------ beam search
def _beam_log_probs(logits: jax.Array, s: Sampling) -> jax.Array:
    """A step's scores as transformers' beam search accumulates them: log-probabilities, divided by the
    temperature and cut by top-k / top-p when sampling (not renormalised)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return logp if s.temperature == 0 else _keep_top(logp / s.temperature, s.top_k, s.top_p)


def _candidates(totals: jax.Array, s: Sampling, key: jax.Array):
    """2K continuations per row of ``totals`` [B, beams * V]: the best, or drawn without replacement in
    proportion to exp(total) (the Gumbel top-k trick) when sampling; their totals and flat indices."""
    ranking = totals if s.temperature == 0 else totals + jax.random.gumbel(key, totals.shape)
    _, idx = jax.lax.top_k(ranking, 2 * s.num_beams)
    return jnp.take_along_axis(totals, idx, axis=-1), idx.astype(jnp.int32)


@partial(jax.jit, static_argnums=(0, 6, 7))
def _beam_prefill(graphdef, state, ids, embeds, mask, key, max_len, sampling):
    """The prompt once per row; the 2K first continuations of its single beam."""
    model = nnx.merge(graphdef, state)
    logits, cache = _forward(model, ids, embeds, mask, model.init_cache(ids.shape[0], max_len))
    totals, idx = _candidates(_beam_log_probs(logits, sampling), sampling, key)
    return totals, jnp.zeros_like(idx), idx, cache


@partial(jax.jit, static_argnums=(0, 7), donate_argnums=3)
def _beam_step(graphdef, state, tokens, cache, scores, mask, key, sampling):
    """One step of every beam [B*K]; the 2K best continuations per row [B, 2K]: totals, beam, token."""
    positions = _positions(mask, cache.index)[:, None]
    logits, cache = nnx.merge(graphdef, state)(tokens[:, None], attention_mask=mask, positions=positions, cache=cache)
    v = logits.shape[-1]
    totals = (_beam_log_probs(logits[:, -1], sampling) + scores.reshape(-1, 1)).reshape(scores.shape[0], -1)
    totals, idx = _candidates(totals, sampling, key)
    return totals, idx // v, idx % v, cache


@dataclass
class _Row:
    """One prompt's beam search: live beams (token lists) with their totals, and the K best finished."""

    beams: list[list[int]]
    scores: list[float]
    done: list[tuple[float, list[int]]]
    open: bool = True


def beam_search(
    model: nnx.Module,
    input_ids: jax.Array,
    max_new_tokens: int,
    *,
    sampling: Sampling,
    attention_mask: jax.Array | None = None,
    inputs_embeds: jax.Array | None = None,
    stop_ids: Sequence[int] = (),
) -> list[list[int]]:
    """The best sequence of new tokens per row (a final stop token included) by transformers' beam search with
    ``sampling.num_beams`` beams and its default ``early_stopping=False``: each step takes 2K continuations;
    those among the top K that end on a stop token (or reach ``max_new_tokens``) are finished, scored by their
    total over (generated length) ** ``length_penalty``, and the K best finished are kept; the best K unfinished
    continue. A row stays open while it has fewer than K finished or its best live beam, scored at the current
    length, beats its worst finished one; decoding ends when no row is open. ``temperature`` > 0 samples the
    continuations (beam-sample), scores divided by the temperature as transformers does."""
    k = sampling.num_beams
    graphdef, state = nnx.split(model)
    b, t = input_ids.shape
    mask = jnp.repeat(_mask(attention_mask, input_ids, max_new_tokens), k, axis=0)
    keys = iter(jax.random.split(jax.random.key(sampling.seed), max_new_tokens))
    rows = [_Row([[]], [0.0], []) for _ in range(b)]
    totals, origin, token, cache = _beam_prefill(
        graphdef, state, input_ids, inputs_embeds, mask[::k], next(keys), t + max_new_tokens, sampling
    )
    for length in range(1, max_new_tokens + 1):
        keep = _advance(
            rows,
            np.asarray(totals),
            np.asarray(origin),
            np.asarray(token),
            set(stop_ids),
            length,
            length == max_new_tokens,
            sampling,
        )
        if not any(r.open for r in rows) or length == max_new_tokens:
            break
        cache = cache.rows(keep)  # each beam's own history
        flat = jnp.asarray([beam[-1] for r in rows for beam in r.beams], jnp.int32)
        scores = jnp.asarray([r.scores for r in rows], jnp.float32)
        totals, origin, token, cache = _beam_step(graphdef, state, flat, cache, scores, mask, next(keys), sampling)
    return [max(r.done, key=lambda d: d[0])[1] for r in rows]


def _advance(rows: list[_Row], totals, origin, token, stops: set, length: int, last: bool, s: Sampling) -> list[int]:
    """Apply one step's 2K candidates per row; returns each new beam's parent in the flat batch."""
    k, keep = s.num_beams, []
    for r, row in enumerate(rows):
        ends = [int(tok) in stops or last for tok in token[r]]
        for rank in range(k):
            if ends[rank] and row.open:
                row.done.append(
                    (
                        float(totals[r, rank]) / length**s.length_penalty,
                        row.beams[origin[r, rank]] + [int(token[r, rank])],
                    )
                )
        row.done = sorted(row.done, key=lambda d: -d[0])[:k]
        # live beams: the K best that did not end (ended ones sink, as transformers' -1e9 does)
        ranked = sorted(range(2 * k), key=lambda i: (ends[i], -totals[r, i]))[:k]
        parents = row.beams
        row.beams = [parents[origin[r, i]] + [int(token[r, i])] for i in ranked]
        row.scores = [float(totals[r, i]) - 1e9 * ends[i] for i in ranked]
        keep += [r * len(parents) + int(origin[r, i]) for i in ranked]
        worst = row.done[-1][0] if len(row.done) == k else -1e9
        row.open = row.open and max(row.scores) / length**s.length_penalty > worst
    return keep
