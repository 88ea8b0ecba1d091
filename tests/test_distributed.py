"""Which ``jax.distributed.initialize`` call each environment gets (the call itself is recorded, not made)."""

import pytest

from mgjax.parallel import distributed
from mgjax.parallel.distributed import DistributedConfig


@pytest.fixture
def calls(monkeypatch):
    made = []
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda *a, **k: made.append((a, k)))
    for var in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    return made


def test_one_process_by_default(calls):
    assert distributed.initialize(DistributedConfig()) == "none" and calls == []


def test_a_coordinator_means_explicit(calls):
    c = DistributedConfig(coordinator="10.0.0.1:1234", num_processes=4, process_id=2, local_device_ids=(2, 3))
    assert distributed.initialize(c) == "explicit"
    assert calls == [(("10.0.0.1:1234", 4, 2), {"local_device_ids": [2, 3]})]


def test_slurm_and_multi_host_tpu_are_found_in_the_environment(calls, monkeypatch):
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1k-0")  # one host: nothing to join
    assert distributed.initialize(DistributedConfig()) == "none"
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1k-0,t1k-1,t1k-2,t1k-3")
    assert distributed.initialize(DistributedConfig()) == "tpu"
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert distributed.initialize(DistributedConfig()) == "slurm"
    assert calls == [((), {"local_device_ids": None})] * 2  # JAX reads the rest from the environment


def test_bad_settings_name_the_field(calls):
    with pytest.raises(ValueError, match="distributed.mode must be one of"):
        distributed.initialize(DistributedConfig(mode="mpi"))
    with pytest.raises(ValueError, match="distributed.coordinator"):
        distributed.initialize(DistributedConfig(mode="explicit", num_processes=2, process_id=0))
    with pytest.raises(ValueError, match="process_id"):
        distributed.initialize(DistributedConfig(coordinator="h:1", num_processes=2, process_id=2))
    assert calls == []
