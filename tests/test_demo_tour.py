"""``python -m mgjax.demo``: tiny models of every registered model class round-trip bit-identically and run (two
CPU-minutes, so slow)."""

import pytest

from mgjax.demo import tour
from mgjax.models.registry import ARCHITECTURES


@pytest.mark.slow
def test_the_tour_covers_every_model_class_and_passes(capsys):
    tour.main(["--new-tokens", "4"])
    out = capsys.readouterr().out
    classes = {target.split(":")[1] for target in ARCHITECTURES.values()}
    missing = [c for c in sorted(classes) if f"  {c}: " not in out]
    assert not missing, f"the tour does not show {missing}"
    assert "bit-identical: False" not in out and out.rstrip().endswith("demo OK")
