"""ConvNeXt parity against transformers (HF layout) and a timm-named copy, computed from tiny random models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import nnx

import mgjax
from mgjax.convert import hf as hf_convert
from mgjax.models.convnext import ConvNextConfig, ConvNextModel
from tests.helpers import max_abs, timm_name

# Stage 2 scans three blocks; a non-default final eps checks that only the final norm uses layer_norm_eps.
SIZES, DEPTHS = [8, 16, 24, 32], [1, 2, 3, 1]
TINY = dict(
    hidden_sizes=SIZES, depths=DEPTHS, image_size=64, patch_size=4, layer_scale_init_value=0.5, layer_norm_eps=1e-3
)


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.ConvNextModel(transformers.ConvNextConfig(**TINY))
    with torch.no_grad():  # norms start at (1, 0), biases near 0, layer scales equal: perturb them all
        for p in hf.parameters():
            p.add_(0.2 * torch.randn_like(p))
    hf.eval()
    path = tmp_path_factory.mktemp("convnext")
    hf.save_pretrained(path)
    return hf, path, mgjax.from_pretrained(path, dtype=jnp.float32)


@pytest.fixture(scope="module")
def pixels():
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return x, jnp.asarray(x.numpy())


@pytest.fixture(scope="module")
def reference(pair, pixels):
    with torch.no_grad():
        return pair[0](pixels[0], output_hidden_states=True)


@pytest.fixture(scope="module")
def output(pair, pixels):
    return pair[2](pixels[1])  # eager calls re-compile every scan: compute the eval forward once


def test_every_output_matches(output, reference, report):
    assert len(output.hidden_states) == len(reference.hidden_states) == 5
    names = ["embeddings"] + [f"stage {i}" for i in range(4)]
    for name, got, want in zip(names, output.hidden_states, reference.hidden_states):
        assert got.shape == _nhwc(want).shape
        report(name, max_abs(got, _nhwc(want)), 1e-4)
    report("last_hidden_state", max_abs(output.last_hidden_state, _nhwc(reference.last_hidden_state)), 1e-4)
    report("pooler_output", max_abs(output.pooler_output, reference.pooler_output), 1e-4)


def test_timm_layout_loads(pair, pixels, reference, tmp_path, report):
    hf, _, _ = pair
    state = hf.state_dict()
    tensors = {timm_name(k): v.contiguous() for k, v in state.items() if not k.startswith("layernorm.")}
    # timm keeps the pooled-output norm in its classifier head, which MGM drops: it must be skipped, not loaded.
    tensors.update({f"head.norm.{n}": state[f"layernorm.{n}"] for n in ("weight", "bias")})
    for key in (
        "stem.0.weight",
        "stem.1.bias",
        "stages.1.downsample.0.weight",
        "stages.3.downsample.1.bias",
        "stages.2.blocks.2.conv_dw.weight",
        "stages.2.blocks.2.norm.weight",
        "stages.2.blocks.2.mlp.fc1.weight",
        "stages.2.blocks.2.mlp.fc2.bias",
        "stages.2.blocks.2.gamma",
    ):
        assert key in tensors, key
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})

    config = ConvNextConfig(hidden_sizes=SIZES, depths=DEPTHS, layer_scale_init_value=0.5, final_norm=False)
    model = mgjax.from_pretrained(tmp_path, config=config, layout="timm")
    assert model.layernorm is None
    out = model(pixels[1])
    for i in range(1, 5):
        report(f"timm stage {i - 1}", max_abs(out.hidden_states[i], _nhwc(reference.hidden_states[i])), 1e-4)
    want_pool = reference.last_hidden_state.mean((-2, -1)).numpy()
    report("timm pooled (no final norm)", max_abs(out.pooler_output, want_pool), 1e-4)
    abstract = nnx.eval_shape(lambda: ConvNextModel(config, rngs=nnx.Rngs(0)))
    assert hf_convert.pick_layout(abstract, tmp_path, ConvNextModel.key_layouts) == "timm"


def test_export_reloads_identically_in_pytorch(pair, tmp_path):
    hf, _, model = pair
    mgjax.save_pretrained(model, tmp_path)
    back, info = transformers.ConvNextModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert back.config.layer_norm_eps == hf.config.layer_norm_eps
    want, got = hf.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_drop_path(pair, pixels, output):
    _, path, model = pair
    x, eval_out = pixels[1], output.last_hidden_state
    dropping = mgjax.from_pretrained(path, dtype=jnp.float32, drop_path_rate=0.5)
    assert np.array_equal(dropping(x).last_hidden_state, eval_out)  # deterministic: identity
    stochastic = nnx.jit(lambda m, rngs: m(x, deterministic=False, rngs=rngs).last_hidden_state)
    a, b, again = (stochastic(dropping, nnx.Rngs(seed)) for seed in (1, 2, 1))
    assert max_abs(a, eval_out) > 1e-2 and max_abs(a, b) > 1e-2
    assert np.array_equal(a, again)
    with pytest.raises(ValueError, match="needs rngs"):
        dropping(x, deterministic=False)
    # Rate 0: stochastic mode is the eval forward.
    assert np.array_equal(model(x, deterministic=False, rngs=nnx.Rngs(1)).last_hidden_state, eval_out)


def test_drop_path_rates_match_hf():
    config = ConvNextConfig(hidden_sizes=SIZES, depths=DEPTHS, drop_path_rate=0.3)
    hf = transformers.ConvNextModel(transformers.ConvNextConfig(**{**TINY, "drop_path_rate": 0.3}))
    for stage, rates in zip(hf.encoder.stages, config.drop_path_rates()):
        want = [getattr(layer.drop_path, "drop_prob", 0.0) for layer in stage.layers]
        np.testing.assert_allclose(rates, want, rtol=1e-6)


def test_remat_changes_nothing(pair, pixels, report):
    _, path, model = pair
    remat = mgjax.from_pretrained(path, dtype=jnp.float32, remat="full")
    # The input gradient runs the whole backward pass (where remat recomputes) at less compile time than
    # parameter gradients.
    loss = lambda m, x: jnp.square(m(x).last_hidden_state).sum()  # noqa: E731
    (la, ga), (lb, gb) = (jax.jit(jax.value_and_grad(loss, argnums=1))(m, pixels[1]) for m in (model, remat))
    report("remat loss / |loss|", abs(float(la - lb)) / abs(float(la)), 1e-6)
    report("remat input grad / max|grad|", max_abs(ga, gb) / float(jnp.abs(ga).max()), 1e-6)
