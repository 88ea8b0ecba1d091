"""``mgjax.inference.chat``: multi-turn conversations with images attached mid-way, streamed answers equal to plain
greedy decoding of the same prompt, and the terminal command."""

import dataclasses
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import mgjax
from mgjax.data import preprocess
from mgjax.inference import chat as chat_cli
from mgjax.inference import decoding
from mgjax.inference.chat import Chat
from mgjax.inference.generate import conversation_inputs, stop_ids
from tests.helpers import help_text, undocumented


@pytest.fixture(scope="module")
def chat_parts(internvl_dir):
    _, path = internvl_dir
    model = mgjax.from_pretrained(path, dtype=jnp.float32)
    return model, transformers.AutoTokenizer.from_pretrained(path), path


def _greedy_answer(model, tok, turns, images, n):
    ids, image_args = conversation_inputs(model, tok, "Hermes-2", turns, images)
    ids = jnp.asarray(ids, jnp.int32)
    stops = stop_ids(tok, "Hermes-2")
    out = np.asarray(
        decoding.greedy(model.language_model, ids, n, inputs_embeds=model.embed(ids, **image_args), stop_ids=stops)
    )[0, ids.shape[1] :]
    return tok.decode(decoding.cut(out.tolist(), stops), skip_special_tokens=True)


def test_turns_stream_the_greedy_answer_and_keep_the_history(chat_parts):
    model, tok, path = chat_parts
    chat = Chat(model, tok, "Hermes-2", max_new_tokens=6)
    first = "".join(chat.say("what is this ?"))
    assert first == _greedy_answer(model, tok, [{"from": "human", "value": "what is this ?"}], [], 6)
    chat.attach(str(path / "cat.png"))  # an image mid-conversation
    second = "".join(chat.say("what is this ?"))
    image = preprocess.load_image(path / "cat.png")
    turns = [
        {"from": "human", "value": "what is this ?"},
        {"from": "gpt", "value": first},
        {"from": "human", "value": "<image>\nwhat is this ?"},
    ]
    assert second == _greedy_answer(model, tok, turns, [image], 6)
    chat.attach(str(path / "cat.png"))  # InternVL: a second image in the same conversation
    "".join(chat.say("and this ?"))
    assert len(chat.turns) == 6 and len(chat.images) == 2
    chat.reset()
    assert chat.turns == [] and chat.images == []


def test_command_line_session(chat_parts, tmp_path):
    _, _, path = chat_parts
    png = bytearray((path / "cat.png").read_bytes())
    png[png.index(b"IDAT") + 12] ^= 0xFF  # a damaged chunk
    (tmp_path / "bad_chunk.png").write_bytes(bytes(png))
    session = (
        f"what is this ?\n/image {path / 'cat.png'}\nwhat ?\n/reset\n/image {tmp_path / 'missing.png'}\n"
        f"/image {tmp_path / 'bad_chunk.png'}\nhi\n/quit\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "mgjax.chat", "--model", str(path), "--max-new-tokens", "4"],
        input=session,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("model> ") == 3 and "(new conversation)" in run.stdout
    assert "missing.png" in run.stderr  # a bad image is reported and the chat goes on
    assert "bad_chunk.png: cannot read image" in run.stderr and "Traceback" not in run.stderr
    # the first message of each conversation went without an image (the one after /reset: its image was missing)
    assert run.stderr.count("warning: InternVLChatModel was given no image (/image PATH attaches one") == 2


def test_help_explains_every_flag_and_shows_defaults(capsys):
    assert undocumented(chat_cli.parser()) == []
    text = help_text(chat_cli.main, [], capsys)
    assert "each answer's budget, in tokens (default: 512)" in text and "(default: runs/chat_images)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_a_missing_model_directory_names_the_flag(tmp_path, capsys):
    assert chat_cli.main(["--model", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"error: --model {tmp_path / 'nowhere'}: no such directory\n"


def test_the_context_bounds_prompts_and_answers(chat_parts, monkeypatch, capsys):
    """Issue 21: a prompt past the model's context was answered silently."""
    model, tok, _ = chat_parts
    lm = model.language_model
    monkeypatch.setattr(lm, "config", dataclasses.replace(lm.config, max_position_embeddings=40))
    chat = Chat(model, tok, "Hermes-2", max_new_tokens=30)
    with pytest.raises(ValueError, match=r"the prompt is \d+ tokens, the model's context 40"):
        list(chat.say("what is this ? " * 12))
    assert chat.turns == []  # the conversation is as it was
    answer = "".join(chat.say("what is this ?"))
    prompt = conversation_inputs(model, tok, "Hermes-2", [{"from": "human", "value": "what is this ?"}], [])[0]
    assert f"warning: the answer is cut to {40 - prompt.shape[1]} tokens" in capsys.readouterr().err
    assert len(tok(answer)["input_ids"]) <= 40 - prompt.shape[1] + 1 and len(chat.turns) == 2
