"""Continuous batching: one decoding thread runs a fixed pool of slots, one request per slot; a request joins at
the next step boundary and leaves when it is done, and its slot is reused. No request waits for another to end.

Each step decodes one token for every slot together (one compiled program per cache length). A request that
arrives is prefilled alone, its prompt left-padded to a multiple of ``BUCKET`` as ``decoding.stream`` pads it, and
its keys and values are copied into its slot's row of the cache; each row keeps its own fill index
(``KVCache.index`` [slots]), so rows of different lengths decode side by side. Sampling settings are per row
(``decoding.choose_rows``) and so are the random keys: a request's i-th token uses the i-th key of
``jax.random.split(key(seed), budget rounded up to BUCKET)``, as ``decoding.stream`` alone would, so a request's
tokens are the ones it would get decoded alone (up to float summation order over a longer cache). The cache
grows (to the next power of two of positions) when a request needs more than it holds, and is released when every
slot is free. Phi-3's LongRoPE switch re-encodes a row alone when it crosses it, as ``decoding.stream`` does.

A ``Job`` is a request: its prompt, sampling, budget and stop strings, and a queue its text goes out through
(pieces of text, then ``(finish_reason, completion_tokens)``; an ``Exception`` if decoding failed).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from mgjax.inference import decoding
from mgjax.models.decoder import KVCache
from mgjax.nn import layers
from mgjax.parallel import sharding

BUCKET = 64  # prompts padded to a multiple of this: a handful of compiled prefill shapes serve every request
MIN_LENGTH = 256  # the smallest cache, in positions


@dataclass(eq=False)  # a job is itself: slots hold jobs by identity
class Job:
    """One request: its prompt (token ids; ``image_args`` for the model's ``embed``), how to decode it, and the
    queue its text goes out through."""

    ids: np.ndarray
    image_args: dict
    sampling: decoding.Sampling
    max_tokens: int
    stops: list[str]
    out: queue.Queue = field(default_factory=queue.Queue)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finished: str | None = None  # stop, length, or cancelled (the client left)
    chat: bool = True  # a chat completion; False: a text completion (/v1/completions)
    submitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None  # when its first token was decoded

    def cancel(self) -> None:
        """The client is gone: its slot is freed at the next step boundary."""
        self.finished = self.finished or "cancelled"


@dataclass(eq=False)
class _Slot:
    """A running job's decoding state beside the cache: its padded prompt and the keys of its sampled tokens."""

    job: Job
    ids: jax.Array  # [1, P], left-padded
    mask: np.ndarray  # [P]
    embeds: jax.Array | None  # [1, P, D] (a VLM's merged prompt), kept where LongRoPE may need it re-encoded
    keys: np.ndarray | None  # [budget rounded up, 2] raw key data, token i drawn with row i; None: greedy
    token: int = 0  # the last token, fed at the next step


def padded(prompt: int) -> int:
    """A prompt's length as prefilled: padded on the left to a multiple of ``BUCKET``."""
    return -(-prompt // BUCKET) * BUCKET


def cache_length(positions: int) -> int:
    """The cache length (per slot) that holds ``positions``: a power of two, at least ``MIN_LENGTH``, so that a
    server compiles a handful of decoding steps."""
    return max(MIN_LENGTH, 1 << (positions - 1).bit_length())


# ------------------------------------------------------------------------------------------------ compiled parts
def _layout(cache: KVCache) -> int:
    """The batch axis of the cache's arrays: 0 per layer, 1 stacked [L, B, S, ...]."""
    return 0 if isinstance(cache.k, layers.PerLayer) else 1


@partial(jax.jit, static_argnums=(0,))
def _prefill(graphdef, state, ids, embeds, mask):
    """One request's prompt [1, P] through the model into a cache of P positions: its last logits and the cache."""
    model = nnx.merge(graphdef, state)
    return decoding._forward(model, ids, embeds, mask, model.init_cache(1, ids.shape[1]))


@partial(jax.jit, static_argnums=(0, 1, 2))
def _empty(graphdef, slots: int, length: int, state) -> tuple[KVCache, jax.Array]:
    """A cache of ``slots`` rows of ``length`` positions, each row with its own index; and its mask. Under a mesh
    (``jax.set_mesh``) its KV heads are split as the attention's are, so that no device holds every one's share."""
    cache = nnx.merge(graphdef, state).init_cache(slots, length)
    heads = (None,) * (_layout(cache) + 2) + ("act_kv_heads",)
    k, v = (jax.tree.map(lambda c: sharding.constrain(c, heads), x) for x in (cache.k, cache.v))
    return KVCache(k, v, jnp.zeros((slots,), jnp.int32)), jnp.ones((slots, length), jnp.int32)


@partial(jax.jit, donate_argnums=(0, 1))
def _place(cache: KVCache, mask: jax.Array, row: KVCache, row_mask: jax.Array, slot: jax.Array):
    """A prefilled row (cache of P positions, mask [P]) into slot ``slot``; later positions count as real."""
    axis = _layout(cache)

    def put(c, r):
        start = [0] * c.ndim
        start[axis] = slot
        return jax.lax.dynamic_update_slice(c, r.astype(c.dtype), start)

    k, v = jax.tree.map(put, cache.k, row.k), jax.tree.map(put, cache.v, row.v)
    length = row_mask.shape[0]
    line = jnp.concatenate([row_mask, jnp.ones((mask.shape[1] - length,), mask.dtype)])
    return KVCache(k, v, cache.index.at[slot].set(length)), mask.at[slot].set(line)


@partial(jax.jit, static_argnums=(2,), donate_argnums=(0, 1))
def _grow(cache: KVCache, mask: jax.Array, length: int):
    """The cache and mask padded to ``length`` positions (rows keep their positions and indices)."""
    axis = _layout(cache) + 1
    more = length - mask.shape[1]

    def pad(c):
        widths = [(0, 0)] * c.ndim
        widths[axis] = (0, more)
        return jnp.pad(c, widths)

    k, v = jax.tree.map(pad, cache.k), jax.tree.map(pad, cache.v)
    return KVCache(k, v, cache.index), jnp.pad(mask, ((0, 0), (0, more)), constant_values=1)


@partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _step(graphdef, state, cache, mask, tokens, temperature, top_k, top_p, keys):
    """One token for every slot, each row at its own position with its own sampling."""
    positions = decoding._positions(mask, cache.index)[:, None]
    logits, cache = nnx.merge(graphdef, state)(tokens[:, None], attention_mask=mask, positions=positions, cache=cache)
    return _choose(logits[:, -1], temperature, top_k, top_p, keys), cache


@partial(jax.jit, static_argnums=(0, 1, 2))
def _embed(fn, graphdef, static: tuple, state, ids, arrays: dict):
    """``fn(model, ids, image_args)`` compiled: a VLM's prompt embeddings (its vision tower run eagerly, op by op,
    cost 0.15 s a request on a tiny InternVL2, ten times its prefill)."""
    return fn(nnx.merge(graphdef, state), ids, {**arrays, **dict(static)})


@jax.jit
def _choose(logits, temperature, top_k, top_p, keys):
    return decoding.choose_rows(logits, temperature, top_k, top_p, jax.random.wrap_key_data(keys))


# ------------------------------------------------------------------------------------------------ the engine
class Engine:
    """The decoding thread. ``submit`` a ``Job``; its text arrives on ``job.out``. ``observe`` (optional) gets
    ``first_token(seconds)``, ``token()`` and ``finished(job)`` calls (the server's metrics)."""

    def __init__(self, model, tokenizer, stop_ids, *, slots: int = 8, observe=None, embed=None):
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, tuple(stop_ids)
        self.lm = getattr(model, "language_model", model)
        self.graphdef, self.state = nnx.split(self.lm)
        self.mesh = next(  # the mesh the model was loaded onto (--mesh), if any
            (x.sharding.mesh for x in jax.tree.leaves(self.state) if isinstance(x.sharding, NamedSharding)), None
        )
        self.embed = embed  # (model, ids [1, P], image_args) -> embeds [1, P, D] (None: token ids alone), traceable
        self.vlm_graphdef, self.vlm_state = nnx.split(model)
        self.slots: list[_Slot | None] = [None] * slots
        self.observe = observe
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.cache: KVCache | None = None
        self.mask: jax.Array | None = None
        self.restart = decoding.reencode_length(self.lm.config)
        self.steps = 0  # decode steps run (for tests and logs)
        self.occupancy: list[int] = []  # slots in use at each step
        threading.Thread(target=self._loop, daemon=True).start()

    def submit(self, job: Job) -> Job:
        self.jobs.put(job)
        return job

    # -- the loop
    def _loop(self) -> None:
        while True:
            try:
                self._admit(block=not any(self.slots))
                self._retire()
                if any(self.slots):
                    self._step()
                    self._retire()
            except Exception as e:  # noqa: BLE001  (a failed decode must not leave clients waiting forever)
                for i, s in enumerate(self.slots):
                    if s is not None:
                        s.job.out.put(RuntimeError(f"decoding failed: {type(e).__name__}: {e}"))
                        self._notify("finished", s.job)
                        self.slots[i] = None
                self.cache = self.mask = None

    def _admit(self, block: bool) -> None:
        """Prefill waiting jobs into free slots (waiting for one when nothing runs)."""
        while None in self.slots:
            try:
                job = self.jobs.get() if block else self.jobs.get_nowait()
            except queue.Empty:
                return
            block = False
            if job.finished:  # cancelled while it waited
                self._finish(job)
                continue
            try:
                self._start(job, self.slots.index(None))
            except Exception as e:  # noqa: BLE001  (this request alone fails: a bad image, a prompt too long)
                job.out.put(RuntimeError(f"decoding failed: {type(e).__name__}: {e}"))
                self._notify("finished", job)

    def _start(self, job: Job, slot: int) -> None:
        ids, mask = decoding.left_pad([job.ids], self.tokenizer.pad_token_id or 0, bucket=BUCKET)
        ids = jnp.asarray(ids)
        embeds = self._embeds(ids, job.image_args)
        keys = None  # greedy rows draw nothing
        if job.sampling.temperature > 0:  # as many keys as the budget stream() would be given
            keys = np.asarray(
                jax.random.key_data(jax.random.split(jax.random.key(job.sampling.seed), padded(job.max_tokens)))
            )
        s = _Slot(job, ids, mask[0], embeds if self.restart else None, keys)  # embeds: for LongRoPE's re-encoding
        logits, row = _prefill(self.graphdef, self.state, ids, embeds, jnp.asarray(mask))
        self._ensure(ids.shape[1] + job.max_tokens)
        self.cache, self.mask = _place(self.cache, self.mask, row, jnp.asarray(mask[0]), jnp.int32(slot))
        self.slots[slot] = s
        self._advance(s, self._sample(s, logits))

    def _embeds(self, ids: jax.Array, image_args: dict) -> jax.Array | None:
        if self.embed is None or not image_args:
            return None
        arrays = {k: v for k, v in image_args.items() if isinstance(v, (jax.Array, np.ndarray))}
        static = tuple(sorted((k, v) for k, v in image_args.items() if k not in arrays))  # token ids and the like
        return _embed(self.embed, self.vlm_graphdef, static, self.vlm_state, ids, arrays)

    def _ensure(self, positions: int) -> None:
        """A cache of at least ``positions`` per row."""
        length = cache_length(positions)
        if self.cache is None:
            with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
                self.cache, self.mask = _empty(self.graphdef, len(self.slots), length, self.state)
        elif self.mask.shape[1] < length:
            self.cache, self.mask = _grow(self.cache, self.mask, length)

    @staticmethod
    def _settings(rows: list[_Slot | None]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Each row's temperature, top-k and top-p (a free slot: greedy)."""
        settings = [
            (s.job.sampling.temperature, s.job.sampling.top_k, s.job.sampling.top_p) if s else (0, 0, 1) for s in rows
        ]
        t, k, p = zip(*settings)
        return jnp.asarray(t, jnp.float32), jnp.asarray(k, jnp.int32), jnp.asarray(p, jnp.float32)

    def _keys(self, rows: list[_Slot | None]) -> jax.Array:
        return jnp.asarray(
            np.stack(
                [
                    s.keys[min(len(s.job.tokens), len(s.keys) - 1)]
                    if s and s.keys is not None
                    else np.zeros(2, np.uint32)
                    for s in rows
                ]
            )
        )

    def _sample(self, s: _Slot, logits: jax.Array) -> int:
        return int(_choose(logits, *self._settings([s]), self._keys([s]))[0])

    def _step(self) -> None:
        crossing = [s for s in self.slots if s and self.restart and len(s.ids[0]) + len(s.job.tokens) == self.restart]
        tokens = jnp.asarray(np.array([s.token if s else 0 for s in self.slots], np.int32))
        out, self.cache = _step(
            self.graphdef,
            self.state,
            self.cache,
            self.mask,
            tokens,
            *self._settings(self.slots),
            self._keys(self.slots),
        )
        self.steps += 1
        self.occupancy.append(sum(s is not None for s in self.slots))
        out = np.asarray(out)
        for i, s in enumerate(self.slots):
            if s is not None and s not in crossing:
                self._advance(s, int(out[i]))
        for s in crossing:
            self._reencode(s)

    def _reencode(self, s: _Slot) -> None:
        """LongRoPE's switch: the row's prompt and answer so far encoded again, alone, into its slot."""
        new = jnp.asarray([s.job.tokens], jnp.int32)
        ids = jnp.concatenate([s.ids, new], axis=1)
        embeds = None if s.embeds is None else jnp.concatenate([s.embeds, self.lm.embed(new)], axis=1)
        mask = np.concatenate([s.mask, np.ones(new.shape[1], np.int32)])
        logits, row = _prefill(self.graphdef, self.state, ids, embeds, jnp.asarray(mask[None]))
        slot = self.slots.index(s)
        self.cache, self.mask = _place(self.cache, self.mask, row, jnp.asarray(mask), jnp.int32(slot))
        self._advance(s, self._sample(s, logits))

    def _advance(self, s: _Slot, token: int) -> None:
        job = s.job
        if job.finished:
            return
        if job.first_token is None:
            job.first_token = time.monotonic()
            self._notify("first_token", job.first_token - job.submitted)
        self._notify("token")
        s.token = token
        if token in self.stop_ids:
            job.finished = "stop"
            return
        job.tokens.append(token)
        text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        cut = min((text.find(x) for x in job.stops if x in text), default=-1)
        if cut >= 0:
            text, job.finished = text[:cut], "stop"
        if text.startswith(job.text) and len(text) > len(job.text):  # bytes of a character may come later
            job.out.put(text[len(job.text) :])
            job.text = text
        if job.finished is None and len(job.tokens) >= job.max_tokens:
            job.finished = "length"

    def _retire(self) -> None:
        """Free the slots of finished (or cancelled) jobs; release the cache when none runs."""
        done = [s.job for s in self.slots if s is not None and s.job.finished]
        self.slots = [None if s is None or s.job.finished else s for s in self.slots]
        if not any(self.slots):
            self.cache = self.mask = None
        for job in done:
            self._finish(job)

    def _finish(self, job: Job) -> None:
        job.out.put((job.finished or "length", len(job.tokens)))
        self._notify("finished", job)

    def _notify(self, event: str, *args) -> None:
        if self.observe is not None:
            getattr(self.observe, event)(*args)
