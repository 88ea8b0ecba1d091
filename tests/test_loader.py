"""The grain loader: seeded order, disjoint host slices, exact bad-sample counts with workers, resumable state."""

import numpy as np
import pytest

from mgjax.data import loader, samples

RECORDS = [{"id": str(i), "x": i} for i in range(40)]


def _make(record):
    if int(record["id"]) % 10 == 3:  # every tenth record is bad
        raise samples.BadSample(record["id"], "broken", "for the test")
    return {"x": np.int32(record["x"]), "sq": np.full(2, record["x"], np.float32)}


def _batches(**kw):
    return loader.Batches(RECORDS, _make, report=samples.BadSamples(max_fraction=0.5), **kw)


def _ids(batches):
    return [int(v) for b in batches for v in b["x"].reshape(-1)]


def test_seeded_order_and_micro_batch_layout():
    a = list(_batches(batch=4, micro_batches=2, seed=1))
    b = list(_batches(batch=4, micro_batches=2, seed=1))
    c = list(_batches(batch=4, micro_batches=2, seed=2))
    assert a[0]["x"].shape == (2, 2) and a[0]["sq"].shape == (2, 2, 2)
    assert _ids(a) == _ids(b) != _ids(c)
    assert sorted(_ids(a)) == sorted(r["x"] for r in RECORDS if r["x"] % 10 != 3)  # 36 good, 9 batches
    assert len(a) == 9


def test_hosts_take_disjoint_slices_and_epochs_reshuffle():
    hosts = [_ids(_batches(batch=2, seed=0, process_index=i, process_count=2)) for i in (0, 1)]
    good = {r["x"] for r in RECORDS if r["x"] % 10 != 3}
    assert not set(hosts[0]) & set(hosts[1]) and set(hosts[0]) | set(hosts[1]) <= good
    assert len(hosts[0]) + len(hosts[1]) >= len(good) - 2  # each host drops at most one partial batch of 2
    two = _ids(_batches(batch=4, seed=0, epochs=2))
    assert len(two) == 72 and two[:36] != two[36:] and sorted(two[:36]) == sorted(two[36:])


def test_bad_samples_are_counted_in_the_main_process_with_workers():
    report = samples.BadSamples(max_fraction=0.5)
    out = list(loader.Batches(RECORDS, _make, batch=4, workers=2, report=report))
    assert len(out) == 9 and report.count == 4 and report.seen == 40
    with pytest.raises(RuntimeError, match="4 of 40 samples are unusable"):
        list(loader.Batches(RECORDS, _make, batch=4, report=samples.BadSamples(max_fraction=0.05)))


def test_state_restores_the_position():
    it = _batches(batch=4, seed=5)
    next(it), next(it)
    state = it.get_state()
    rest = _ids(it)
    again = _batches(batch=4, seed=5)
    again.set_state(state)
    assert _ids(again) == rest


# ---------------------------------------------------------------- grouping by modality and length, buckets


def _lengths(seed=0):
    """Distinct lengths (so sorted runs are unambiguous): 70 image records, 45 text-only ones, one of length 0."""
    rng = np.random.default_rng(seed)
    image = rng.permutation(np.arange(20, 720, 10))[:70]
    text = -rng.permutation(np.arange(1, 451, 10))[:44]
    return rng.permutation(np.concatenate([image, text, [0]]))


def _full_batches(order, lengths, batch):
    """grouped_order's full batches: the incomplete ones (one per modality, each < batch) come last."""
    n_full = sum(int(np.sum(m)) // batch for m in (lengths > 0, lengths <= 0))
    return order[: n_full * batch].reshape(n_full, batch)


def test_grouped_order_is_a_permutation_that_never_mixes_modalities():
    lengths = _lengths()
    order = loader.grouped_order(lengths, 4, np.random.default_rng(0))
    assert order.dtype.kind == "i" and sorted(order.tolist()) == list(range(len(lengths)))
    full = _full_batches(order, lengths, 4)
    image = lengths[full] > 0  # the 0 length must join the text-only group
    assert (image.all(1) | ~image.any(1)).all()
    assert len(full) == 70 // 4 + 45 // 4
    # the remainders close the order: 70 % 4 image records, then 45 % 4 text-only ones
    assert (lengths[order[len(full) * 4 :]] > 0).tolist() == [True, True, False]
    assert 0 < image.all(1)[: len(full) // 2].sum() < len(full) // 2  # the batches are shuffled across modalities


def test_grouped_order_cuts_sorted_megabatches():
    lengths = _lengths()
    rng = np.random.default_rng(1)
    full = np.abs(lengths[_full_batches(loader.grouped_order(lengths, 4, rng), lengths, 4)])
    assert (np.diff(full, axis=1) <= 0).all()  # each batch is a slice of a descending sort
    spread = (full.max(1) - full.min(1)).mean()
    shuffled = np.abs(lengths[rng.permutation(len(lengths))[: len(full) * 4]]).reshape(-1, 4)
    assert spread < 0.3 * (shuffled.max(1) - shuffled.min(1)).mean()
    # One megabatch per modality: every batch is a contiguous run of its modality's sorted lengths.
    full = _full_batches(loader.grouped_order(lengths, 4, rng, megabatch=100), lengths, 4)
    lo, hi = np.abs(lengths[full]).min(1), np.abs(lengths[full]).max(1)
    same = (lengths[full[:, 0]] > 0)[:, None] == (lengths[full[:, 0]] > 0)[None, :]
    overlap = (lo[:, None] < hi[None, :]) & (lo[None, :] < hi[:, None]) & same
    assert not (overlap & ~np.eye(len(full), dtype=bool)).any()


def test_grouped_order_is_seeded():
    lengths = _lengths()
    a, b, c = (loader.grouped_order(lengths, 4, np.random.default_rng(s)) for s in (3, 3, 4))
    assert (a == b).all() and not (a == c).all()
    assert loader.grouped_order([], 4, np.random.default_rng(0)).size == 0


@pytest.mark.parametrize(
    "length, max_length, buckets, want",
    [
        (1, 64, 4, 16),
        (16, 64, 4, 16),
        (17, 64, 4, 32),
        (64, 64, 4, 64),
        (0, 64, 4, 16),
        (100, 64, 4, 64),
        (5, 64, 1, 64),
        (1, 10, 3, 4),
        (9, 10, 3, 10),
    ],
)
def test_bucket(length, max_length, buckets, want):
    assert loader.bucket(length, max_length, buckets) == want


def test_bucket_never_exceeds_max_length_and_always_fits():
    for max_length in (7, 10, 64, 100):
        for buckets in (1, 3, 4, 8):
            got = {loader.bucket(n, max_length, buckets) for n in range(1, max_length + 1)}
            assert max(got) == max_length and len(got) <= buckets
            assert all(n <= loader.bucket(n, max_length, buckets) <= max_length for n in range(1, max_length + 1))


def test_record_length():
    chat = [{"from": "human", "value": "<image>\nwhat color is it ?"}, {"from": "gpt", "value": "red"}]
    assert loader.record_length({"image": "a.png", "conversations": chat}, 16) == 6 + 1 + 16
    assert loader.record_length({"conversations": chat}, 16) == -7
    assert loader.record_length({"image": None, "conversations": chat}, 16) == -7
    assert loader.record_length({"conversations": []}, 16) == -1  # empty text-only records stay text-only (< 0)
    assert loader.record_length({"image": "a.png", "conversations": ["junk", {"value": "a b"}]}, 16) == 18
    assert loader.record_length(samples.BadSample("1", "unreadable JSON line", ""), 16) == 1


MAX_LENGTH = 32


def _real(i: int) -> int:
    """Record i's real tokens: spread over 1..MAX_LENGTH so batches land in different buckets."""
    return 1 + (i * 7) % MAX_LENGTH


def _make_sequence(record):
    i = int(record["id"])
    if i % 10 == 3:
        raise samples.BadSample(record["id"], "broken", "for the test")
    mask = np.arange(MAX_LENGTH) < _real(i)
    return {
        "input_ids": np.where(mask, 5, 0).astype(np.int32),
        "labels": np.where(mask, 5, -100).astype(np.int32),
        "attention_mask": mask,
        "images": np.full((3, 2, 2), i, np.float32),
        "x": np.int32(i),
    }


def _sequence_batches(**kw):
    return list(
        loader.Batches(
            RECORDS, _make_sequence, batch=4, micro_batches=2, report=samples.BadSamples(max_fraction=0.5), **kw
        )
    )


def test_buckets_trim_sequence_keys_to_the_longest_row():
    lengths = [_real(i) for i in range(len(RECORDS))]
    out = _sequence_batches(seed=0, lengths=lengths, buckets=4)
    for b in out:
        longest = max(_real(int(i)) for i in b["x"].reshape(-1))
        keep = loader.bucket(longest, MAX_LENGTH, 4)
        assert all(b[k].shape == (2, 2, keep) for k in loader.SEQUENCE_KEYS if k != "segment_ids")
        assert b["images"].shape == (2, 2, 3, 2, 2) and b["x"].shape == (2, 2)
        # nothing real is cut: every row keeps all of its tokens
        assert b["attention_mask"].sum() == sum(_real(int(i)) for i in b["x"].reshape(-1))
        assert (b["labels"][~b["attention_mask"]] == -100).all()
    assert {b["input_ids"].shape[-1] for b in out} != {MAX_LENGTH}
    # grouped batches are narrower than shuffled ones: the point of grouping
    shuffled = _sequence_batches(seed=0, buckets=4)
    assert sum(b["input_ids"].shape[-1] for b in out) < sum(b["input_ids"].shape[-1] for b in shuffled)
    assert {b["input_ids"].shape[-1] for b in _sequence_batches(seed=0, lengths=lengths)} == {MAX_LENGTH}


def test_grouped_batches_yield_every_good_record_once_per_epoch():
    lengths = [_real(i) if i % 2 else -_real(i) for i in range(len(RECORDS))]
    ids = _ids(_sequence_batches(seed=3, epochs=2, lengths=lengths, buckets=4))
    good = sorted(r["x"] for r in RECORDS if r["x"] % 10 != 3)  # 36 good records: 9 whole batches an epoch
    assert sorted(ids[:36]) == good and sorted(ids[36:]) == good and ids[:36] != ids[36:]


def test_later_epochs_keep_modalities_apart():
    lengths = [10 + i for i in range(10)] + [-(5 + i) for i in range(7)]  # 17 records: 10 image, 7 text-only
    records = [{"x": i} for i in range(17)]
    out = list(loader.Batches(records, lambda r: {"x": np.int32(r["x"])}, batch=4, epochs=2, lengths=lengths))
    image = [[lengths[int(i)] > 0 for i in b["x"].reshape(-1)] for b in out]
    mixed = [i for i, b in enumerate(image) if any(b) and not all(b)]
    assert len(mixed) <= 2  # only each epoch's merged remainders, as MGM's sampler merges them


def _sequence(record):
    """A sample of 1-5 tokens (its id repeated) and one tile, as packing reads them."""
    x = _make(record)["x"]
    n = 1 + int(x) % 5
    return {
        "input_ids": np.full(8, x, np.int32),
        "labels": np.full(8, x, np.int32),
        "attention_mask": np.arange(8) < n,
        "pixel_values": np.full((1, 1), x, np.float32),
        "tiles": np.int32(1),
    }


def test_packed_batches_resume_exactly():
    """Packed rows hold a varying number of records; a restored loader continues with the very rows the first
    one would have given (the sample held for the next row is read again, not lost)."""
    kw = dict(batch=2, seed=0, epochs=2, pack=dict(length=8, tiles=3))
    first = loader.Batches(RECORDS, _sequence, report=samples.BadSamples(max_fraction=0.5), **kw)
    head = [next(first) for _ in range(3)]
    state = first.get_state()
    rest = list(first)
    assert all(int(s) >= 1 for b in head + rest for s in b["samples"].reshape(-1))
    assert any(int(s) > 1 for b in head for s in b["samples"].reshape(-1))  # really packed
    again = loader.Batches(RECORDS, _sequence, report=samples.BadSamples(max_fraction=0.5), **kw)
    again.set_state(state)
    resumed = list(again)
    assert len(resumed) == len(rest)
    for a, b in zip(rest, resumed):
        assert all(np.array_equal(a[k], b[k]) for k in a)
