"""``mgjax.inference.serve`` through the official ``openai`` client: answers equal greedy decoding, streaming,
concurrent requests batched (with the same answers), and 4xx errors after which the server keeps serving."""

import base64
import io
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import jax.numpy as jnp
import numpy as np
import openai
import pytest
import transformers
from PIL import Image

import mgjax
from mgjax.inference import decoding, serve
from mgjax.inference.generate import conversation_inputs, stop_ids
from tests.helpers import help_text, undocumented


@pytest.fixture(scope="module")
def running(internvl_dir):
    _, path = internvl_dir
    model = mgjax.from_pretrained(path, dtype=jnp.float32)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    service = serve.Service(model, tok, "tiny", max_batch=4, wait=0.5, max_prompt_tokens=120, max_tokens=6)
    httpd = serve.server(service, port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", api_key="unused", max_retries=0, timeout=300
    )
    yield service, client, path
    httpd.shutdown()


def _data_uri(path) -> str:
    buf = io.BytesIO()
    Image.open(path).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _messages(text, image=None):
    parts = [{"type": "image_url", "image_url": {"url": image}}] if image else []
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def _greedy(service, messages, n=6) -> str:
    turns, images = serve.conversation(messages)
    ids, args = conversation_inputs(service.model, service.tokenizer, "Hermes-2", turns, images)
    ids = jnp.asarray(ids, jnp.int32)
    stops = stop_ids(service.tokenizer, "Hermes-2")
    embeds = service.model.embed(ids, **args) if args else None
    out = np.asarray(decoding.greedy(service.model.language_model, ids, n, inputs_embeds=embeds, stop_ids=stops))
    return service.tokenizer.decode(decoding.cut(out[0, ids.shape[1] :].tolist(), stops), skip_special_tokens=True)


def test_models_and_an_answer_with_an_image(running):
    service, client, path = running
    assert [m.id for m in client.models.list().data] == ["tiny"]
    messages = _messages("what is this ?", _data_uri(path / "cat.png"))
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6)
    assert reply.choices[0].message.content == _greedy(service, messages)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 6


def test_streaming_gives_the_same_text(running):
    _, client, path = running
    messages = _messages("a red cat ?", _data_uri(path / "cat.png"))
    whole = client.chat.completions.create(model="tiny", messages=messages).choices[0].message.content
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_concurrent_requests_are_batched_with_their_own_answers(running):
    service, client, path = running
    image = _data_uri(path / "cat.png")
    prompts = [
        _messages("what is this ?", image),
        _messages("what ?"),
        _messages("a cat is red .", image),
        _messages("this is a cat ?"),
    ]
    before = len(service.batcher.batch_sizes)
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda m: client.chat.completions.create(model="tiny", messages=m), prompts))
    assert max(service.batcher.batch_sizes[before:]) > 1
    assert [r.choices[0].message.content for r in replies] == [_greedy(service, m) for m in prompts]


def test_bad_requests_get_4xx_and_the_server_goes_on(running):
    _, client, path = running
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=_messages("hi"))
    with pytest.raises(openai.BadRequestError, match="does not decode"):
        client.chat.completions.create(model="tiny", messages=_messages("hi", "data:image/png;base64,aGVsbG8="))
    with pytest.raises(openai.BadRequestError, match="only data: URIs"):
        client.chat.completions.create(model="tiny", messages=_messages("hi", "https://example.com/cat.png"))
    with pytest.raises(openai.BadRequestError, match="more than this server's 120"):
        client.chat.completions.create(model="tiny", messages=_messages("what is this ? " * 60))
    with pytest.raises(openai.BadRequestError, match="last message must be the user's"):
        client.chat.completions.create(model="tiny", messages=[{"role": "assistant", "content": "hi"}])
    reply = client.chat.completions.create(model="tiny", messages=_messages("what ?"), max_tokens=3, stop=["zzz"])
    assert reply.choices[0].message.content is not None


def test_command_line_server(internvl_dir):
    import subprocess
    import sys

    _, path = internvl_dir
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mgjax.serve",
            "--model",
            str(path),
            "--port",
            "0",
            "--name",
            "cli",
            "--max-tokens",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving cli on http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        client = openai.OpenAI(base_url=line.split(" on ")[1].strip(), api_key="unused", max_retries=0, timeout=300)
        reply = client.chat.completions.create(model="cli", messages=_messages("what ?"))
        assert reply.usage.completion_tokens <= 2
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_command_line_refuses_a_directory_without_a_model(tmp_path, capsys):
    assert serve.main(["--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --model {tmp_path}: no config.json in ") and "config=" not in err


def test_command_line_refuses_a_taken_port_and_an_unknown_template(internvl_dir, capsys):
    _, path = internvl_dir
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve.main(["--model", str(path), "--port", str(port)]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"error: --host 127.0.0.1 --port {port}: ")
    assert serve.main(["--model", str(path), "--template", "bogus"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: unknown conversation template 'bogus'")


def test_help_explains_every_flag_and_shows_defaults(capsys):
    assert undocumented(serve.parser()) == []
    text = help_text(serve.main, [], capsys)
    assert "seconds a request waits for others to join it (default: 0.05)" in text and "(default: 8000)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
