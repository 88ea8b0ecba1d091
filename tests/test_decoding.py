"""Decoding (``mgjax.inference.decoding``) against transformers on a tiny random Llama: left-padded batches decode as
their rows alone, the sampling warpers equal transformers' processors, and beam search picks transformers' beams."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import mgjax
from mgjax.inference import decoding
from mgjax.inference.decoding import Sampling

EOS = 3


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A transformers Llama (f32, eval) and the same weights in mgjax."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=EOS,
        pad_token_id=0,
        bos_token_id=1,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peaked logits: few near-ties, so float noise cannot flip a choice
        hf.lm_head.weight.mul_(8.0)
    path = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(path)
    return hf, mgjax.from_pretrained(path, dtype=jnp.float32)


def _prompts(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(4, 48, n).tolist() for n in (5, 9, 2)]


def test_left_padded_batch_decodes_each_row_as_alone(pair):
    _, model = pair
    prompts = _prompts()
    ids, mask = decoding.left_pad(prompts, pad_id=0, bucket=16)
    assert ids.shape == (3, 16) and mask.sum(1).tolist() == [5, 9, 2]
    together = np.asarray(decoding.generate(model, jnp.asarray(ids), 10, attention_mask=jnp.asarray(mask)))
    for i, p in enumerate(prompts):
        alone = np.asarray(decoding.greedy(model, jnp.asarray([p]), 10))[0, len(p) :]
        assert together[i, ids.shape[1] :].tolist() == alone.tolist(), i


def test_greedy_matches_transformers_on_a_left_padded_batch(pair):
    hf, model = pair
    ids, mask = decoding.left_pad(_prompts(1), pad_id=0)
    with torch.no_grad():
        want = hf.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        ).numpy()
    got = np.asarray(decoding.generate(model, jnp.asarray(ids), 12, attention_mask=jnp.asarray(mask)))
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=0.7),
        dict(temperature=1.3, top_k=5),
        dict(temperature=1.0, top_p=0.6),
        dict(temperature=0.5, top_k=10, top_p=0.9),
    ],
)
def test_warpers_equal_transformers_processors(settings):
    logits = np.random.default_rng(2).normal(size=(3, 40)).astype(np.float32) * 3
    processors = transformers.LogitsProcessorList()
    processors.append(transformers.TemperatureLogitsWarper(settings["temperature"]))
    if settings.get("top_k"):
        processors.append(transformers.TopKLogitsWarper(settings["top_k"]))
    if settings.get("top_p"):
        processors.append(transformers.TopPLogitsWarper(settings["top_p"]))
    want = torch.log_softmax(processors(None, torch.tensor(logits)), -1).numpy()
    got = np.asarray(decoding.warp(jnp.asarray(logits), Sampling(**settings)))
    assert (np.isinf(got) == np.isinf(want)).all()
    finite = np.isfinite(want)
    assert np.abs(got[finite] - want[finite]).max() <= 1e-5


def test_sampling_is_seeded_and_degenerates_to_greedy(pair):
    _, model = pair
    ids = jnp.asarray([_prompts()[1]])
    greedy = np.asarray(decoding.greedy(model, ids, 8))
    for s in (Sampling(temperature=1.0, top_k=1, seed=3), Sampling(temperature=2.0, top_p=1e-6, seed=4)):
        assert np.asarray(decoding.generate(model, ids, 8, sampling=s)).tolist() == greedy.tolist()
    a = np.asarray(decoding.generate(model, ids, 8, sampling=Sampling(temperature=1.5, seed=7)))
    b = np.asarray(decoding.generate(model, ids, 8, sampling=Sampling(temperature=1.5, seed=7)))
    c = np.asarray(decoding.generate(model, ids, 8, sampling=Sampling(temperature=1.5, seed=8)))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_sampled_tokens_follow_the_warped_distribution():
    """10,000 draws of one step: frequencies within 0.02 of softmax(logits / T) over the top-3 tokens."""
    logits = jnp.asarray([[2.0, 1.5, 1.0, 0.0, -1.0]])
    s = Sampling(temperature=0.8, top_k=3)
    draws = jax.vmap(lambda k: decoding.choose(logits, s, k))(jax.random.split(jax.random.key(0), 10_000))
    freq = np.bincount(np.asarray(draws).ravel(), minlength=5) / 10_000
    want = np.exp(np.asarray(decoding.warp(logits, s))[0])
    assert np.abs(freq - want).max() < 0.02 and freq[3:].sum() == 0


def test_stream_stops_when_every_row_has_stopped(pair):
    _, model = pair
    ids, mask = decoding.left_pad(_prompts(), pad_id=0)
    steps = list(decoding.stream(model, jnp.asarray(ids), 20, attention_mask=jnp.asarray(mask)))
    first = steps[0].tolist()  # stop on each row's first token: one step only
    assert (
        len(list(decoding.stream(model, jnp.asarray(ids), 20, attention_mask=jnp.asarray(mask), stop_ids=first))) == 1
    )
    assert len(steps) == 20 and decoding.cut([5, 7, EOS, 9], [EOS]) == [5, 7]


@pytest.mark.parametrize("beams, penalty", [(2, 1.0), (3, 1.0), (4, 0.5)])
def test_beam_search_matches_transformers(pair, beams, penalty):
    hf, model = pair
    eos = _frequent_token(hf)
    for prompt in _prompts(5):
        with torch.no_grad():
            want = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=10,
                num_beams=beams,
                do_sample=False,
                length_penalty=penalty,
                eos_token_id=eos,
                pad_token_id=0,
            ).numpy()[0, len(prompt) :]
        got = decoding.beam_search(
            model, jnp.asarray([prompt]), 10, sampling=Sampling(num_beams=beams, length_penalty=penalty), stop_ids=[eos]
        )[0]
        assert got == want.tolist(), (prompt, got, want)


def _frequent_token(hf) -> int:
    """A token the random model often ranks high, so that beams do finish on it before the budget."""
    with torch.no_grad():
        logits = hf(torch.arange(4, 44).view(4, 10)).logits
    return int(torch.topk(logits.reshape(-1, logits.shape[-1]), 3).indices.flatten().mode().values)


def test_beam_search_on_a_padded_batch_equals_rows_alone(pair):
    _, model = pair
    prompts = _prompts(2)
    ids, mask = decoding.left_pad(prompts, pad_id=0)
    s = Sampling(num_beams=3)
    together = decoding.beam_search(model, jnp.asarray(ids), 8, sampling=s, attention_mask=jnp.asarray(mask))
    alone = [decoding.beam_search(model, jnp.asarray([p]), 8, sampling=s)[0] for p in prompts]
    assert together == alone


def test_beam_sample_is_seeded(pair):
    _, model = pair
    ids = jnp.asarray([_prompts()[0]])

    def run(seed):
        return decoding.beam_search(model, ids, 8, sampling=Sampling(num_beams=3, temperature=1.0, seed=seed))

    assert run(1) == run(1) and len(run(1)[0]) == 8
    assert len({tuple(run(s)[0]) for s in range(6)}) > 1
