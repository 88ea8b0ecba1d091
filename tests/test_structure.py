"""Structural rules every model obeys, checked on abstract models (no memory, no compute), for every family mgjax
implements on tiny configs: each parameter carries known logical axes, one per dimension (a Mixtral expert weight
its ``experts`` axis after ``layers``); each parameter, stacked or not, names its own HF keys; each config
round-trips through HF's config.json."""

import dataclasses

import pytest
from flax import nnx

from mgjax.convert.keymap import STACK_AXES, hf_keys, path_name
from mgjax.demo.tour import CLIP, CONVNEXT, LLAMA
from mgjax.models.decoder import GemmaConfig, InternLM2Config, LlamaConfig, MixtralConfig, Phi3Config, Qwen2Config
from mgjax.models.internvit import InternVisionConfig
from mgjax.models.internvl import InternVLConfig
from mgjax.models.mgm import MGMConfig
from mgjax.models.registry import model_class
from mgjax.parallel.sharding import LOGICAL_AXES

DECODER = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)
MIXTRAL = MixtralConfig(**DECODER, num_local_experts=4, num_experts_per_tok=2)
INTERNLM2 = InternLM2Config(**DECODER)  # its default rope is the one from_hf reads: the config round-trips
VIT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7
)
# the demo tour's towers: CLIP's 4x4 grid mines 4x4 windows of the 64 px HR map (16x16 after ConvNeXt's stem)
MGM = MGMConfig(
    vision=CLIP,
    vision_aux=dataclasses.replace(CONVNEXT, final_norm=False),
    llm=LlamaConfig(**DECODER),
    image_size_aux=64,
)

MODELS = {
    "clip": CLIP,
    "convnext": CONVNEXT,
    "llama": LLAMA,
    "qwen2": Qwen2Config(**DECODER),
    "gemma": GemmaConfig(**DECODER),
    "mixtral": MIXTRAL,
    "phi3": Phi3Config(**DECODER),
    "internlm2": dataclasses.replace(INTERNLM2, attention_bias=True),
    "internvit-300m": InternVisionConfig(**VIT),
    "internvit-6b": InternVisionConfig(**VIT, norm_type="rms_norm", use_qk_norm=True, attention_bias=False),
    "internvit-original": InternVisionConfig(**VIT, original=True),
    "internvl2-qwen2": InternVLConfig(vision=InternVisionConfig(**VIT), llm=Qwen2Config(**DECODER), image_token_id=5),
    "internvl2-internlm2": InternVLConfig(vision=InternVisionConfig(**VIT), llm=INTERNLM2),
    "internvl2-phi3": InternVLConfig(vision=InternVisionConfig(**VIT), llm=Phi3Config(**DECODER)),
    "internvl2-native": InternVLConfig(
        vision=InternVisionConfig(**VIT), llm=Qwen2Config(**DECODER), image_token_id=5, native=True
    ),
    "mgm": MGM,
    "mgm-hd": dataclasses.replace(MGM, image_grid=2, image_global=True, image_size_aux=128),
    "mgm-gemma": dataclasses.replace(MGM, llm=GemmaConfig(**DECODER)),
    "mgm-mixtral": dataclasses.replace(MGM, llm=MIXTRAL),
    "mgm-lr-only": dataclasses.replace(MGM, mining=False),
}
STACKED = {c for components in STACK_AXES.values() for c in components}  # the key components HF numbers


@pytest.fixture(scope="module", params=list(MODELS))
def params(request):
    """(config, [(path, abstract parameter)]) of one model, built once for every test below that reads it."""
    config = MODELS[request.param]
    cls = model_class(config.model_type)
    model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    return config, nnx.to_flat_state(nnx.state(model, nnx.Param))


def test_every_parameter_has_known_logical_axes(params):
    _, flat = params
    assert len(flat) > 0
    for path, var in flat:
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), (path, axes, var.shape)
        assert all(a in LOGICAL_AXES for a in axes if a is not None), (path, axes)


def test_every_parameter_names_its_own_hf_keys(params):
    """A stacked parameter gives one HF key per slice, its index after the ``layers`` / ``experts`` component that
    HF numbers; no two tensors share a key."""
    _, flat = params
    keys = [key for path, var in flat for _, key in hf_keys(path, var)]
    assert len(keys) == len(set(keys))
    for key in keys:
        parts = key.split(".")
        for stacked, index in zip(parts, parts[1:]):
            assert stacked not in STACKED or index.isdigit(), key


@pytest.mark.parametrize("name", ["mixtral", "mgm-mixtral"])
def test_expert_weights_carry_the_experts_axis(name):
    """Each expert weight is [layers, experts, ...], one HF tensor per layer and expert; the router is per layer."""
    config = MODELS[name]
    moe = config.llm if isinstance(config, MGMConfig) else config
    model = nnx.eval_shape(lambda: model_class(config.model_type)(config, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    experts = [(p, v) for p, v in flat if "experts" in p]
    assert sorted(path_name(p[p.index("experts") + 1 :]) for p, _ in experts) == ["w1.weight", "w2.weight", "w3.weight"]
    for path, var in experts:
        axes = var.get_metadata()["out_sharding"]
        assert axes[:2] == ("layers", "experts") and "experts" not in axes[2:], (path, axes)
        assert var.shape[:2] == (moe.num_hidden_layers, moe.num_local_experts), (path, var.shape)
        assert len(hf_keys(path, var)) == moe.num_hidden_layers * moe.num_local_experts
    gates = [v for p, v in flat if path_name(p).endswith("block_sparse_moe.gate.weight")]
    assert len(gates) == 1 and gates[0].get_metadata()["out_sharding"][0] == "layers"
    assert "experts" not in gates[0].get_metadata()["out_sharding"]


@pytest.mark.parametrize("config", MODELS.values(), ids=list(MODELS))
def test_config_round_trips_through_hf_json(config):
    again = type(config).from_hf(config.to_hf())
    assert again == config
