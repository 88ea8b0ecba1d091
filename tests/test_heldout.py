"""Held-out accuracy: exact teacher-forced answers, per-type counts, skipped records, and batch padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mgjax
from mgjax.data import samples
from mgjax.data.templates import IGNORE_INDEX
from mgjax.demo import mgm_task
from mgjax.eval import heldout

CONFIG = mgm_task.model_config(mining=False)  # LR-only: the same inputs, a fraction of the init and compile


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4 held-out images, one record per question type each: 12 records, 4 per type."""
    root = tmp_path_factory.mktemp("heldout")
    _, eval_path = mgm_task.write_dataset(root, n_train=0, n_eval=4)
    records = list(samples.read_records(eval_path))
    make = samples.MGMSamples(
        CONFIG, mgm_task.tokenizer(), mgm_task.TEMPLATE, str(root), max_length=64, pad_to_square=True, pad_id=0
    )
    return records, make


class NextToken(nnx.Module):
    """Predicts each position's next input id: under teacher forcing, a model that never errs."""

    def __call__(self, input_ids, images, images_aux):
        return jax.nn.one_hot(jnp.maximum(jnp.roll(input_ids, -1, axis=1), 0), len(mgm_task.WORDS)), None


class Fixed(nnx.Module):
    """Returns the same logits whatever the inputs."""

    def __init__(self, logits):
        self.logits = nnx.Variable(jnp.asarray(logits))

    def __call__(self, input_ids, images, images_aux):
        return self.logits[...], None


def _wrong_answer(make, sample_id):
    """``make`` with one answer token of record ``sample_id`` relabelled: the model's argmax can no longer match."""

    def corrupt(record):
        s = make(record)
        if record["id"] == sample_id:
            labels = s["labels"].copy()
            first = np.flatnonzero(labels != IGNORE_INDEX)[0]
            labels[first] = (labels[first] + 1) % len(mgm_task.WORDS)
            s = {**s, "labels": labels}
        return s

    return corrupt


def test_exact_answers_scores_every_labelled_token_and_nothing_else():
    v, x = 10, IGNORE_INDEX
    labels = jnp.array(
        [
            [x, 5, 7, x],  # both answer tokens predicted: right
            [x, 5, 7, x],  # the second answer token wrong: wrong
            [x, x, x, x],  # nothing to answer: never right
            [x, x, 7, 2],
        ]
    )  # wrong only where nothing is labelled, and at the last position: right
    predicted = jnp.array([[5, 7, 0, 0], [5, 8, 0, 0], [0, 0, 0, 0], [3, 7, 2, 9]])
    ids = jnp.zeros((4, 4), jnp.int32)
    hits = heldout.exact_answers(
        Fixed(jax.nn.one_hot(predicted, v)), {"input_ids": ids, "images": None, "images_aux": None}, labels
    )
    assert hits.tolist() == [True, False, False, True]


def test_accuracy_is_exact_on_answers(data):
    records, make = data
    perfect = heldout.accuracy(NextToken(), records, make, batch=4)
    assert {k: (r["right"], r["total"], r["accuracy"]) for k, r in perfect.items()} == {
        k: (4, 4, 1.0) for k in mgm_task.QUESTIONS
    }
    wrong = next(r for r in records if r["type"] == "count")
    score = heldout.accuracy(NextToken(), records, _wrong_answer(make, wrong["id"]), batch=4)
    assert {k: r["right"] for k, r in score.items()} == {"color": 4, "count": 3, "word": 4}
    assert score["count"]["accuracy"] == 0.75
    # exactly that record fails: the one relabelled token decides
    good = [_wrong_answer(make, wrong["id"])(r) for r in records]
    stacked = {k: jnp.asarray(np.stack([s[k] for s in good])) for k in (*heldout.INPUTS, "labels")}
    hits = heldout.exact_answers(NextToken(), {k: stacked[k] for k in heldout.INPUTS}, stacked["labels"])
    assert [r["id"] for r, hit in zip(records, hits.tolist()) if not hit] == [wrong["id"]]


def test_padding_copies_are_not_scored(data):
    records, make = data
    # the relabelled record comes last, so it is the one copied into the padding of a short last chunk
    make = _wrong_answer(make, records[-1]["id"])
    results = [heldout.accuracy(NextToken(), records, make, batch=b) for b in (3, 5, 64)]
    assert results[0] == results[1] == results[2]
    assert sum(r["total"] for r in results[0].values()) == len(records)
    assert sum(r["right"] for r in results[0].values()) == len(records) - 1


def test_totals_and_skipped_records_per_type_with_a_real_model(data):
    records, make = data
    model = mgjax.init(CONFIG, seed=0)
    missing = {**records[0], "id": "missing", "image": "images/nowhere.png"}
    text_only = {
        "id": "text",
        "conversations": [{"from": "human", "value": "what color is the square ?"}, {"from": "gpt", "value": "red"}],
    }  # no "type": counted as "all"
    score = heldout.accuracy(model, [missing, *records, text_only], make, batch=8)
    kind = records[0]["type"]
    assert {k: (r["total"], r["skipped"]) for k, r in score.items()} == {
        **{k: (4, 0) for k in mgm_task.QUESTIONS},
        kind: (4, 1),
        "all": (1, 0),
    }
    for r in score.values():
        assert 0 <= r["right"] <= r["total"] and r["accuracy"] == r["right"] / r["total"]
    only_bad = heldout.accuracy(model, [missing], make, batch=8)
    assert only_bad[kind]["total"] == 0 and only_bad[kind]["skipped"] == 1 and np.isnan(only_bad[kind]["accuracy"])


def test_greedy_answers_batched_equal_one_by_one(tmp_path):
    """``answers`` decodes prompts of one length together: each row's tokens equal its decoding alone."""
    from mgjax.demo import grounding_task

    _, _, eval_path = grounding_task.write_dataset(tmp_path, n_train=0, n_eval=6)
    tok = grounding_task.tokenizer()
    model = mgjax.init(grounding_task.model_config(tok.convert_tokens_to_ids("<IMG_CONTEXT>")), seed=1)
    make = samples.InternVLSamples(
        model.config,
        tok,
        grounding_task.TEMPLATE,
        str(tmp_path),
        max_length=128,
        max_dynamic_patch=grounding_task.MAX_DYNAMIC_PATCH,
        tile_slots=5,
    )
    prompts = [make.prompt(r) for r in samples.read_records(eval_path)]
    assert len({len(p["input_ids"]) for p in prompts}) < len(prompts)  # some lengths shared: real batches
    stops = (tok.convert_tokens_to_ids("<|im_end|>"),)
    together = heldout.answers(model, prompts, max_new_tokens=6, stop_ids=stops, batch=4)
    alone = [heldout.answers(model, [p], max_new_tokens=6, stop_ids=stops, batch=1)[0] for p in prompts]
    assert together == alone and any(alone)
