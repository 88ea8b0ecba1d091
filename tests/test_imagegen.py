"""MGM's text-to-image path: the <GEN> request, the <h>…</h> prompt as MGM's CLI extracts it, and a tiny random
diffusers pipeline built offline drawing it into a file beside the answer."""

import json

import pytest
import torch

from mgjax.inference import imagegen
from mgjax.inference.chat import Chat


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A random Stable Diffusion pipeline of 16-pixel images, saved as safetensors (nothing downloaded)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("sd")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(
            block_out_channels=(8,),
            latent_channels=4,
            norm_num_groups=4,
            sample_size=16,
            down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",),
        ),
        text_encoder=CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        ),
        tokenizer=CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=77),
        unet=UNet2DConditionModel(
            block_out_channels=(8, 16),
            layers_per_block=1,
            sample_size=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16,
            attention_head_dim=2,
            norm_num_groups=4,
        ),
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "pipeline")
    return root / "pipeline"


def test_the_prompt_is_the_last_h_pair_and_needs_both_tags():
    assert imagegen.ask_for_image("draw a cat") == "draw a cat <GEN>"
    assert imagegen.image_prompt("Sure! <h>a red cat, oil painting</h>") == "a red cat, oil painting"
    assert imagegen.image_prompt("<h>first</h> then <h> second </h> end") == "second"
    for answer in ("no tags", "<h>open only", "close only</h>", "</h>reversed<h>"):
        assert imagegen.image_prompt(answer) is None, answer


def test_a_diffusers_pipeline_draws_the_prompt(pipeline, tmp_path):
    draw = imagegen.DiffusersBackend(pipeline, steps=2, size=16, seed=0)
    path = imagegen.imagine("Here: <h>a red cat</h>", draw, tmp_path, "001")
    assert path == tmp_path / "001.png" and (tmp_path / "001.txt").read_text() == "a red cat\n"
    from PIL import Image

    first = Image.open(path).convert("RGB")
    assert first.size == (16, 16)
    again = imagegen.imagine("<h>a red cat</h>", draw, tmp_path, "002")
    assert list(Image.open(again).convert("RGB").getdata()) == list(first.getdata())  # seeded
    assert imagegen.imagine("no prompt here", draw, tmp_path, "003") is None and not (tmp_path / "003.png").exists()


def test_chat_asks_for_an_image_and_saves_it_beside_the_answer(internvl_dir, pipeline, tmp_path, monkeypatch):
    import jax.numpy as jnp
    import transformers

    import mgjax

    _, path = internvl_dir
    model = mgjax.from_pretrained(path, dtype=jnp.float32)
    chat = Chat(
        model,
        transformers.AutoTokenizer.from_pretrained(path),
        "Hermes-2",
        max_new_tokens=3,
        gen=True,
        draw=imagegen.DiffusersBackend(pipeline, steps=2, size=16, seed=0),
        image_dir=str(tmp_path),
    )
    "".join(chat.say("a red cat"))
    assert chat.turns[0]["value"] == "a red cat <GEN>"
    assert chat.last_image is None  # a random model writes no <h>…</h>
    monkeypatch.setattr("mgjax.inference.decoding.cut", lambda tokens, stops: [])  # an empty answer...
    monkeypatch.setattr(chat.tokenizer, "decode", lambda *a, **k: "ok <h>a cat</h>")  # ...that reads as a prompt
    "".join(chat.say("again"))
    assert chat.last_image == tmp_path / "002.png" and chat.last_image.exists()
