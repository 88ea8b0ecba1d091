"""bench/tpu_fit.py's search, with the compiler replaced by a rule (a step needs NEED / chips, the estimate says
twice that, and 128 rows do not split over 256 chips): it compiles where the estimate less its error bound first
fits, walks back down while compiled steps still fit, writes one row per compile, compiles the largest slice
where the estimate rules out every one and, run again, compiles nothing it has a row for."""

import importlib.util
from pathlib import Path

import pytest

from mgjax.train import plan

GiB = 1 << 30
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tpu_fit(monkeypatch):
    spec = importlib.util.spec_from_file_location("tpu_fit", ROOT / "bench" / "tpu_fit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    compiles, need_total = [], {"total": 400 * GiB}

    def report(c, name, compile=False, **_):
        t = plan.topology(name)
        if t.chips > 128:
            raise plan.PlanError("global batch 128 does not split")
        need = need_total["total"] // t.chips
        r = {
            "release": "MGM-2B",
            "topology": {"chips": t.chips, "hbm_bytes": t.hbm_bytes},
            "mesh": {"fsdp": t.chips},
            "batch": {"global": 128, "per_device": 128 // t.chips, "seq_len": 2048},
            "remat": "full",
            "bytes_per_device": {"total": 2 * need},
            "fits": None,
            "compiled_bytes_per_device": None,
        }
        if compile:
            compiles.append(name)
            r["compiled_bytes_per_device"] = {"peak": need, "temporaries": need}
            r["fits"] = need <= t.hbm_bytes
        return r

    monkeypatch.setattr(module.plan, "report", report)
    return module, compiles, need_total


def test_the_smallest_fitting_slice_is_found_compiled_and_kept(tpu_fit, tmp_path):
    module, compiles, need = tpu_fit
    out = tmp_path / "rows.jsonl"
    config = str(ROOT / "configs" / "mgm" / "MGM-2B" / "stage2.yaml")
    # v5p, 95 GiB per chip: the estimate less 15% first fits on 8 chips (85 GiB); compiled there (50 GiB), then 4
    # chips (100 GiB) do not fit
    row = module.fit(config, [], "v5p", out)
    assert (row["slice"], row["fits"], row["compiled_gib"]) == ("v5p-16", True, 50.0)
    assert compiles == ["v5p-16", "v5p-8"]
    # v5e, 16 GiB per chip: first compiled on 64 chips, down to 32 (12.5 GiB); 16 chips need 25
    assert module.fit(config, [], "v5e", out)["slice"] == "v5e-32"
    assert compiles[2:] == ["v5e-64", "v5e-32", "v5e-16"]
    assert len(module.done(out)) == 5
    compiles.clear()
    assert module.fit(config, [], "v5p", out)["slice"] == "v5p-16" and compiles == []  # resumed from the rows
    lines = module.table(module.done(out)).splitlines()
    assert lines[2].startswith("| MGM-2B stage 2 | v5p | v5p-16 (8 chips, fsdp 8) | 16 × 2048 | 50.0 (100.0) | 95 |")
    assert lines[2].endswith("| v5p-8: 100.0 GiB |") and "| v5e | v5e-32 (32 chips" in lines[3]
    # ten times the need: the estimate rules out every v5e slice, so the largest one is compiled to say so
    need["total"] *= 10
    assert module.fit(config, ["model.remat=full"], "v5e", out) is None and compiles == ["v5e-128"]
