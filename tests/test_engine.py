"""Continuous batching (``mgjax.inference.engine``): requests that join a running batch at step boundaries, leave
when done and reuse slots, each decoding exactly the tokens it decodes alone (``decoding.stream``), greedy or
sampled with its own settings; Phi-3's LongRoPE switch crossed by one row while another stays below it."""

import time

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from PIL import Image

import mgjax
from mgjax.data import templates
from mgjax.inference import decoding, engine
from mgjax.inference.generate import batch_embeds, conversation_inputs, default_template
from mgjax.nn import layers
from tests.helpers import tokenizer
from tests.test_decoder import LONGROPE, PHI3_IDS


@pytest.fixture(scope="module")
def internvl(internvl_dir):
    _, path = internvl_dir
    model = mgjax.from_pretrained(path, dtype=jnp.float32)
    layers.unstack(model.language_model)  # the serving layout
    words = transformers.AutoTokenizer.from_pretrained(path)
    return model, words, default_template(model, words), Image.open(path / "cat.png")


def _job(model, words, template, text, image, budget, sampling=decoding.Sampling()):
    ids, image_args = conversation_inputs(
        model,
        words,
        template,
        [{"from": "human", "value": (templates.IMAGE + "\n" if image else "") + text}],
        [image] if image else [],
    )
    return engine.Job(ids[0], image_args, sampling, budget, [])


def _alone(model, words, job, stop_ids):
    """The job's tokens decoded by itself, as ``decoding.stream`` decodes one request."""
    ids, mask = decoding.left_pad([job.ids], words.pad_token_id or 0, bucket=engine.BUCKET)
    ids = jnp.asarray(ids)
    embeds = batch_embeds(model, ids, [job.image_args]) if job.image_args else None
    lm = getattr(model, "language_model", model)
    budget = -(-job.max_tokens // engine.BUCKET) * engine.BUCKET
    out = []
    for step in decoding.stream(
        lm, ids, budget, attention_mask=jnp.asarray(mask), inputs_embeds=embeds, sampling=job.sampling
    ):
        token = int(step[0])
        if token in stop_ids:
            break
        out.append(token)
        if len(out) == job.max_tokens:
            break
    return out


def _wait(jobs, timeout=300):
    results = []
    for job in jobs:
        pieces = []
        while True:
            item = job.out.get(timeout=timeout)
            if isinstance(item, Exception):
                raise item
            if isinstance(item, tuple):
                break
            pieces.append(item)
        results.append(("".join(pieces), item))
    return results


class Events:
    def __init__(self):
        self.done, self.tokens = [], 0

    def first_token(self, seconds):
        pass

    def token(self):
        self.tokens += 1

    def finished(self, job):
        self.done.append(job)


def test_requests_join_and_leave_a_running_batch_and_decode_as_alone(internvl):
    model, words, template, cat = internvl
    events = Events()
    eng = engine.Engine(
        model, words, stop_ids=(), slots=2, observe=events, embed=lambda m, i, a: batch_embeds(m, i, [a]) if a else None
    )
    long = _job(model, words, template, "describe the cat in many words", cat, 60)
    eng.submit(long)
    while long.first_token is None:
        time.sleep(0.01)
    # while it decodes: short requests join, one with an image, one without; the third waits for a free slot
    short = [
        _job(model, words, template, "what is this ?", cat, 5),
        _job(model, words, template, "a red cat is", None, 9),
        _job(model, words, template, "the cat", None, 4),
    ]
    for job in short:
        eng.submit(job)
    results = _wait([long, *short])
    assert [r[1] for r in results] == [("length", 60), ("length", 5), ("length", 9), ("length", 4)]
    assert events.done.index(long) == 3  # the short ones left first: nobody waited for the long one to end
    assert max(eng.occupancy) == 2 and eng.cache is None  # slots shared; the cache released once all were done
    for job in (long, *short):
        assert job.tokens == _alone(model, words, job, ()), job.ids
    assert events.tokens == 60 + 5 + 9 + 4


def test_each_row_samples_with_its_own_settings_as_alone(internvl):
    model, words, template, cat = internvl
    eng = engine.Engine(
        model, words, stop_ids=(), slots=4, embed=lambda m, i, a: batch_embeds(m, i, [a]) if a else None
    )
    settings = [
        decoding.Sampling(temperature=1.0, seed=3),
        decoding.Sampling(temperature=0.7, top_p=0.9, seed=5),
        decoding.Sampling(temperature=1.3, top_k=5, seed=7),
        decoding.Sampling(),  # greedy beside them
    ]
    jobs = [_job(model, words, template, "a red cat is", None, 12, s) for s in settings]
    for job in jobs:
        eng.submit(job)
    _wait(jobs)
    assert max(eng.occupancy) > 1
    for job in jobs:
        assert job.tokens == _alone(model, words, job, ()), job.sampling
    assert len({tuple(j.tokens) for j in jobs}) > 1  # the settings made a difference


def test_a_row_crossing_longrope_switch_is_reencoded_alone(tmp_path):
    """Phi-3 switches to its long factors past ``original_max_position_embeddings`` (80 here): the row that
    crosses is re-encoded as ``decoding.stream`` does, and the row beside it keeps its short factors."""
    words = tokenizer()
    cfg = transformers.Phi3Config(
        vocab_size=len(words.get_vocab()),
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_scaling=LONGROPE,
        original_max_position_embeddings=80,
        max_position_embeddings=320,
        **PHI3_IDS,
    )
    transformers.Phi3ForCausalLM(cfg).save_pretrained(tmp_path)
    model = mgjax.from_pretrained(tmp_path, dtype=jnp.float32)
    layers.unstack(model)
    eng = engine.Engine(model, words, stop_ids=(), slots=2)
    ids = np.asarray(words("a red cat is")["input_ids"], np.int32)
    crossing = engine.Job(ids, {}, decoding.Sampling(), 30, [])  # prompt bucket 64: crosses 80 at its 17th token
    below = engine.Job(ids[:3], {}, decoding.Sampling(), 10, [])
    eng.submit(crossing)
    eng.submit(below)
    _wait([crossing, below])
    assert crossing.tokens == _alone(model, words, crossing, ())
    assert below.tokens == _alone(model, words, below, ())


def test_a_cancelled_request_frees_its_slot(internvl):
    model, words, template, _ = internvl
    eng = engine.Engine(model, words, stop_ids=(), slots=1)
    first = _job(model, words, template, "a red cat is", None, 200)
    second = _job(model, words, template, "the cat", None, 3)
    eng.submit(first)
    eng.submit(second)
    while len(first.tokens) < 2:
        time.sleep(0.01)
    first.cancel()
    (_, (reason, n)), (_, end) = _wait([first, second])
    assert reason == "cancelled" and n < 200 and end == ("length", 3)


def test_an_mgm_request_with_an_image_decodes_as_alone(mgm_zoo, internvl):
    """MGM's prompt embeddings (both towers and mining, compiled by the engine) in a slot beside a text row."""
    zoo, _ = mgm_zoo
    model = mgjax.from_pretrained(zoo / "MGM-single", dtype=jnp.float32, towers_root=zoo)
    words = tokenizer()
    template = default_template(model, words)
    cat = internvl[3]
    eng = engine.Engine(
        model, words, stop_ids=(), slots=2, embed=lambda m, i, a: batch_embeds(m, i, [a]) if a else None
    )
    jobs = [_job(model, words, template, "what is this ?", cat, 6), _job(model, words, template, "a red cat", None, 6)]
    for job in jobs:
        eng.submit(job)
    _wait(jobs)
    for job in jobs:
        assert job.tokens == _alone(model, words, job, ())
