"""``python -m mgjax.generate`` on tiny converted checkpoints, and greedy decoding with images against transformers."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

import mgjax
from mgjax.data import preprocess
from mgjax.inference import decoding, generate
from tests import test_mgm

SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<image>"]
WORDS = ["[UNK]", *SPECIALS, "user", "assistant", "system", "what", "is", "this", "?", "a", "red", "cat", ".", "\n"]


def _tokenizer():
    """A word-level tokenizer small enough for the tiny models' 160-entry vocabularies."""
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="[UNK]",
        additional_special_tokens=SPECIALS[2:],
    )


def test_greedy_with_an_image_matches_transformers_generate(internvl_dir):
    hf, path = internvl_dir
    model = mgjax.from_pretrained(path, dtype=jnp.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    image = preprocess.load_image(path / "cat.png")
    ids, image_args = generate._inputs(model, tokenizer, "Hermes-2", "what is this ?", image)
    assert image_args["pixel_values"].shape == (11, 3, 28, 28)  # a 5x2 grid for a 70x30 image, plus the thumbnail
    ours = np.asarray(
        decoding.greedy(
            model.language_model, jnp.asarray(ids), 32, inputs_embeds=model.embed(jnp.asarray(ids), **image_args)
        )
    )
    # torch reference: recompute the whole sequence each step (transformers' cached generate can flip near-ties
    # of this random model: at one step here its top-2 logits differ by less than its cache-vs-full noise)
    want = torch.from_numpy(ids)
    pixels = torch.from_numpy(np.array(image_args["pixel_values"]))
    with torch.no_grad():
        for _ in range(32):
            step = hf(input_ids=want, pixel_values=pixels).logits[:, -1].argmax(-1, keepdim=True)
            want = torch.cat([want, step], dim=1)
    want = want.numpy()
    np.testing.assert_array_equal(ours, want)


def test_command_line_from_a_fresh_process(internvl_dir):
    _, path = internvl_dir
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mgjax.generate",
            "--model",
            str(path),
            "--image",
            str(path / "cat.png"),
            "--prompt",
            "what is this ?",
            "--max-new-tokens",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.endswith("\n") and "error" not in run.stderr  # a random model's words: any text will do


def test_bad_inputs_exit_with_a_clear_message(internvl_dir, tmp_path, capsys):
    _, path = internvl_dir
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not an image")
    assert generate.main(["--model", str(path), "--image", str(tmp_path / "broken.png"), "--prompt", "hi"]) == 2
    assert "broken.png: cannot read image" in capsys.readouterr().err
    prompt = "<image> and <image> ?"
    assert generate.main(["--model", str(path), "--image", str(path / "cat.png"), "--prompt", prompt]) == 2
    assert "the conversation has 2 <image> placeholders but 1 image was given" in capsys.readouterr().err
    assert generate.main(["--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_mgm_checkpoint_generates(tmp_path, capsys):
    ref = test_mgm.Reference("hd")
    ref.checkpoint(tmp_path)
    _tokenizer().save_pretrained(tmp_path)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 40, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    assert (
        generate.main(
            [
                "--model",
                str(tmp_path),
                "--image",
                str(tmp_path / "x.png"),
                "--prompt",
                "what ?",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.endswith("\n")
