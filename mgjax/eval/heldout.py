"""Held-out evaluation. ``accuracy``: answer accuracy by teacher forcing, a record counting as right when the model's
argmax reproduces every labelled token of its answer (end-of-turn marker included); that is exactly what greedy
decoding would produce for the answer, at the cost of one batched forward pass instead of one per token.
``answers``: greedy answers of a VLM to prompts, for scores that parse free text (boxes, option letters)."""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.multihost_utils import process_allgather

from mgjax.data import samples
from mgjax.data.templates import IGNORE_INDEX
from mgjax.inference.decoding import cut, greedy

INPUTS = ("input_ids", "images", "images_aux")


@nnx.jit
def exact_answers(model: nnx.Module, batch: dict[str, jax.Array], labels: jax.Array) -> jax.Array:
    """[B] bool: every labelled next token is the argmax."""
    logits, _ = model(**batch)
    target, valid = labels[:, 1:], labels[:, 1:] != IGNORE_INDEX
    hit = (jnp.argmax(logits[:, :-1], axis=-1) == target) | ~valid
    return jnp.all(hit, axis=-1) & jnp.any(valid, axis=-1)


def accuracy(
    model: nnx.Module,
    records: Sequence[dict],
    make: Callable[[dict], dict],
    *,
    batch: int = 64,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, dict[str, float]]:
    """Per ``type`` field of the records (``"all"`` without one): ``{"right", "total", "accuracy"}``, plus
    ``"skipped"`` for records ``make`` rejects (counted under their type, never scored as wrong or right).
    With the ``mesh`` of a (possibly multi-process) sharded model, every process scores the same records."""
    put = (
        jnp.asarray
        if mesh is None
        else functools.partial(
            jax.make_array_from_process_local_data, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        )
    )
    right, total, skipped = defaultdict(int), defaultdict(int), defaultdict(int)
    made = [(r.get("type", "all"), samples.Safe(make)(r)) for r in records]
    for kind, s in made:
        if isinstance(s, samples.BadSample):
            skipped[kind] += 1
    good = [(kind, s) for kind, s in made if not isinstance(s, samples.BadSample)]
    for lo in range(0, len(good), batch):
        chunk = good[lo : lo + batch]
        padded = chunk + [chunk[-1]] * (batch - len(chunk))  # one compiled shape; the copies are not scored
        stacked = {k: put(np.stack([s[k] for _, s in padded])) for k in (*INPUTS, "labels")}
        hits = process_allgather(exact_answers(model, {k: stacked[k] for k in INPUTS}, stacked["labels"]), tiled=True)
        for (kind, _), hit in zip(chunk, hits):
            right[kind] += int(hit)
            total[kind] += 1
    kinds = sorted(set(total) | set(skipped))
    return {
        k: {
            "right": right[k],
            "total": total[k],
            "skipped": skipped[k],
            "accuracy": right[k] / total[k] if total[k] else float("nan"),
        }
        for k in kinds
    }


@nnx.jit
def _embed(model: nnx.Module, input_ids: jax.Array, pixel_values: jax.Array) -> jax.Array:
    return model.embed(input_ids, pixel_values)


def answers(
    model: nnx.Module,
    prompts: Sequence[dict[str, np.ndarray]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    batch: int = 16,
) -> list[list[int]]:
    """Greedy answer token ids (cut before the first of ``stop_ids``) of an InternVL model to ``prompts``
    (``InternVLSamples.prompt``: ``input_ids`` [T], ``pixel_values`` [slots, 3, S, S]). Prompts of one length
    decode together, so no row is padded and a batch decodes exactly as its rows would one by one."""
    out: list[list[int]] = [[] for _ in prompts]
    by_length = defaultdict(list)
    for i, p in enumerate(prompts):
        by_length[len(p["input_ids"])].append(i)
    stops = tuple(stop_ids)
    for length, rows in sorted(by_length.items()):
        for lo in range(0, len(rows), batch):
            chunk = rows[lo : lo + batch]
            filled = chunk + [chunk[-1]] * (batch - len(chunk))  # one compiled shape per length
            ids = jnp.asarray(np.stack([prompts[i]["input_ids"] for i in filled]))
            pixels = jnp.asarray(np.stack([prompts[i]["pixel_values"] for i in filled]))
            new = np.asarray(
                greedy(
                    model.language_model, ids, max_new_tokens, inputs_embeds=_embed(model, ids, pixels), stop_ids=stops
                )
            )[:, length:]
            for i, row in zip(chunk, new.tolist()):
                out[i] = cut(row, stops)
    return out
