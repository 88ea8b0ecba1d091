"""``python -m mgjax.generate`` on tiny converted checkpoints, and greedy decoding with images against transformers."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import mgjax
from mgjax.data import preprocess
from mgjax.inference import decoding, generate
from tests.helpers import MGMReference, help_text, tokenizer, undocumented


def test_help_explains_every_flag_and_shows_defaults(capsys):
    assert undocumented(generate.parser()) == []
    text = help_text(generate.main, [], capsys)
    assert "the answer's budget, in tokens (default: 64)" in text
    assert "(default: bfloat16)" in text  # the model options every command shares
    assert "(default: None)" not in text and "(default: False)" not in text


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


def test_command_line_from_a_fresh_process(internvl_dir, tmp_path):
    """... with the persistent compilation cache a command turns on (the suite's own cache set aside)."""
    _, path = internvl_dir
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["MGJAX_COMPILATION_CACHE"] = str(tmp_path / "cache")
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
        env=env,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.endswith("\n") and "error" not in run.stderr  # a random model's words: any text will do
    assert "no image" not in run.stderr
    assert any((tmp_path / "cache").iterdir())  # the compiled programs, for the next call


def test_bad_inputs_exit_with_a_clear_message(internvl_dir, tmp_path, capsys):
    _, path = internvl_dir
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not an image")
    assert generate.main(["--model", str(path), "--image", str(tmp_path / "broken.png"), "--prompt", "hi"]) == 2
    assert "broken.png: cannot read image" in capsys.readouterr().err
    prompt = "<image> and <image> ?"
    assert generate.main(["--model", str(path), "--image", str(path / "cat.png"), "--prompt", prompt]) == 2
    assert "the conversation has 2 <image> placeholders but 1 image was given" in capsys.readouterr().err
    assert generate.main(["--model", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --model {tmp_path}: no config.json in ") and "config=" not in err
    assert generate.main(["--model", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == f"error: --model {tmp_path / 'nowhere'}: no such directory\n"
    for flag, value, message in (  # issue 21: --max-new-tokens -1 was a traceback
        ("--max-new-tokens", "-1", "must be >= 1, not -1"),
        ("--top-p", "nan", "must be a finite number from 0 to 1, not nan"),
        ("--num-beams", "two", "expected an integer, got 'two'"),
    ):
        with pytest.raises(SystemExit) as exit:
            generate.main(["--model", str(path), "--prompt", "hi", flag, value])
        assert exit.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err


def test_only_vision_models_are_warned_of_a_missing_image(internvl_dir, capsys):
    _, path = internvl_dir
    model = mgjax.from_pretrained(path, dtype=jnp.float32)
    generate.warn_without_image(model.language_model, "a hint")  # a plain LM takes no images
    assert capsys.readouterr().err == ""
    generate.warn_without_image(model, "a hint")
    assert (
        capsys.readouterr().err
        == "warning: InternVLChatModel was given no image (a hint); it answers from the text alone\n"
    )


def test_mgm_checkpoint_generates_and_warns_without_an_image(tmp_path, capsys):
    ref = MGMReference("hd")
    ref.checkpoint(tmp_path)
    tokenizer().save_pretrained(tmp_path)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 40, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    args = ["--model", str(tmp_path), "--prompt", "what ?", "--max-new-tokens", "4"]
    assert generate.main([*args, "--image", str(tmp_path / "x.png")]) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n") and "no image" not in err
    assert generate.main(args) == 0  # it still answers, from the text alone
    out, err = capsys.readouterr()
    assert out.endswith("\n")
    assert "warning: MGMForCausalLM was given no image (--image PATH gives it one)" in err
