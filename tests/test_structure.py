"""Structural rules every model obeys, checked on abstract models (no memory, no compute)."""

import pytest
from flax import nnx

from mgjax.demo.tour import CLIP, CONVNEXT, LLAMA
from mgjax.models.registry import model_class
from mgjax.parallel.sharding import LOGICAL_AXES


@pytest.mark.parametrize("config", [CLIP, CONVNEXT, LLAMA], ids=lambda c: c.model_type)
def test_every_parameter_has_known_logical_axes(config):
    cls = model_class(config.model_type)
    model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert len(params) > 0
    for path, var in params:
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), (path, axes, var.shape)
        assert all(a in LOGICAL_AXES for a in axes if a is not None), (path, axes)


@pytest.mark.parametrize("config", [CLIP, CONVNEXT, LLAMA], ids=lambda c: c.model_type)
def test_config_round_trips_through_hf_json(config):
    again = type(config).from_hf(config.to_hf())
    assert again == config
