"""The grain loader: seeded order, disjoint host slices, exact bad-sample counts with workers, resumable state."""
import numpy as np
import pytest

from mgjax import loader, samples

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
