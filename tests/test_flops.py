"""Step FLOPs by role (the 6N / 4N / 2N rule of the module docstring) and the chips' peaks."""

import dataclasses
from types import SimpleNamespace

import pytest
from flax import nnx

from mgjax.demo import mgm_task
from mgjax.models.mgm import MGMForCausalLM
from mgjax.nn import params
from mgjax.train import flops, optim

SEQ = 64
NOTHING = ()  # no parameter trains: every component costs its forward once
EVERYTHING = (r".*",)
LLM_ONLY = (r"language_model\..*",)


def _model(**changes):
    """Abstract (shapes only): the counts need sizes, not values, and skip the seconds an init takes on a CPU."""
    config = dataclasses.replace(mgm_task.model_config(), **changes)
    return nnx.eval_shape(lambda: MGMForCausalLM(config, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def model():
    return _model()


def _flops(model, patterns, batch=2, seq_len=SEQ):
    # the filter make_optimizer hands nnx.Optimizer as ``wrt`` (train.run passes ``opt.wrt``)
    return flops.mgm_step_flops(model, params.trainable(patterns), batch=batch, seq_len=seq_len)


def _llm_forward(config, seq_len: int) -> float:
    """Independent count per sample: 2 FLOPs per matmul weight per position, plus causal attention."""
    c = config.llm
    attention = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)  # q, o; k, v
    weights = c.num_hidden_layers * (attention + 3 * c.hidden_size * c.intermediate_size) + c.vocab_size * c.hidden_size
    scores = c.num_hidden_layers * 4 * seq_len**2 * c.num_attention_heads * c.head_dim / 2  # QK^T and AV, halved
    return 2 * seq_len * weights + scores


def _mm_projector_forward(config) -> float:
    v, d = config.vision.hidden_size, config.llm.hidden_size
    return 2 * config.tokens_per_image * (v * d + d * d)


@pytest.mark.parametrize("patterns", [NOTHING, EVERYTHING, LLM_ONLY, optim.MGM_STAGE1, optim.MGM_STAGE2])
def test_roles_add_up_to_the_total(model, patterns):
    out = _flops(model, patterns)
    assert set(out) == {"trainable", "frozen_on_gradient_path", "frozen", "total"}
    assert out["total"] == pytest.approx(out["trainable"] + out["frozen_on_gradient_path"] + out["frozen"])
    assert min(out.values()) >= 0 and out["total"] > 0


def test_everything_trainable_is_three_forwards(model):
    forward = _flops(model, NOTHING)
    out = _flops(model, EVERYTHING)
    assert forward["trainable"] == forward["frozen_on_gradient_path"] == 0
    assert out["frozen"] == out["frozen_on_gradient_path"] == 0
    assert out["total"] == pytest.approx(3 * forward["total"])


@pytest.mark.parametrize("seq_len", [SEQ, 256])
def test_llm_term_follows_the_6n_rule(model, seq_len):
    out = _flops(model, LLM_ONLY, batch=3, seq_len=seq_len)
    # Norm weights are counted as matmul weights too: well under 1% here.
    assert out["trainable"] == pytest.approx(3 * 3 * _llm_forward(model.config, seq_len), rel=1e-2)
    assert out["frozen_on_gradient_path"] == 0  # nothing trains before the LLM


def test_stage1_llm_is_on_the_gradient_path_and_towers_are_not(model):
    llm = _flops(model, LLM_ONLY)["trainable"] / 3
    stage1, stage2, forward = (_flops(model, p) for p in (optim.MGM_STAGE1, optim.MGM_STAGE2, NOTHING))
    # stage 1: the frozen LLM sits after the trained projectors (forward + input gradients: 2x)
    assert stage1["frozen_on_gradient_path"] == pytest.approx(2 * llm)
    # the towers come before every trained parameter: forward only, the same in both stages
    towers = forward["total"] - llm - stage1["trainable"] / 3
    assert stage1["frozen"] == pytest.approx(towers) and stage2["frozen"] == pytest.approx(towers)
    assert 0 < towers < forward["total"]
    assert stage2["frozen_on_gradient_path"] == 0
    assert stage2["trainable"] == pytest.approx(stage1["trainable"] + 3 * llm)


def test_a_partly_trained_component_pays_weight_gradients_for_its_share(model):
    llm = _flops(model, LLM_ONLY)["trainable"] / 3
    out = _flops(model, (r"language_model\.lm_head\..*",))
    c = model.config.llm
    share = c.vocab_size * c.hidden_size / params.count_params(model.language_model)
    assert out["trainable"] == pytest.approx(3 * share * llm)
    assert out["frozen_on_gradient_path"] == pytest.approx(2 * (1 - share) * llm)


def test_flops_scale_linearly_in_batch(model):
    one, five = _flops(model, optim.MGM_STAGE1, batch=1), _flops(model, optim.MGM_STAGE1, batch=5)
    assert all(five[k] == pytest.approx(5 * one[k]) for k in one)


def test_lr_only_model_has_no_convnext_or_mining_term(model):
    lr_only = _model(mining=False)
    mining, lr = _flops(model, optim.MGM_STAGE1), _flops(lr_only, optim.MGM_STAGE1)
    assert lr["total"] < mining["total"]
    assert lr["frozen"] < mining["frozen"]  # the ConvNeXt tower is gone
    # biases are counted as weights: 1.6% of this tiny projector
    assert lr["trainable"] == pytest.approx(3 * 2 * _mm_projector_forward(lr_only.config), rel=3e-2)
    assert mining["trainable"] > lr["trainable"]  # the mining projections train in stage 1
    assert lr["frozen_on_gradient_path"] == pytest.approx(mining["frozen_on_gradient_path"])  # same LLM


def test_clip_term_counts_only_the_layers_that_run():
    lr_only = _model(mining=False)
    v = lr_only.config.vision
    tokens, run = v.grid**2 + 1, v.num_hidden_layers - 1  # hidden_states[-2]: the last layer is never run
    layer = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
    patches = 2 * v.grid**2 * v.num_channels * v.patch_size**2 * v.hidden_size
    expect = patches + run * (2 * tokens * layer + 4 * tokens**2 * v.hidden_size)
    out = _flops(lr_only, (r"mm_projector\..*",), batch=1)  # the tower alone is frozen
    assert out["frozen"] == pytest.approx(expect, rel=0.1)


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("TPU v5 lite", 197e12),
        ("TPU v6 lite", 918e12),
        ("TPU v4", 275e12),
        ("Some new chip", None),
    ],
)
def test_peak_flops_matches_device_kind(kind, peak):
    assert flops.peak_flops(SimpleNamespace(device_kind=kind)) == peak


def test_peak_flops_knows_tpu_v5p():
    assert flops.peak_flops(SimpleNamespace(device_kind="TPU v5")) == 459e12


def test_peak_flops_is_unknown_on_cpu():
    assert flops.peak_flops() is None
