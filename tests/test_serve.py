"""``mgjax.inference.serve`` through the official ``openai`` client: answers equal greedy decoding, streaming,
concurrent requests batched (with the same answers), and 4xx errors after which the server keeps serving; the
transport's limits through raw sockets; image URLs from a local image server."""

import base64
import http.client
import http.server
import io
import ipaddress
import json
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import jax.numpy as jnp
import numpy as np
import openai
import pytest
import transformers
from PIL import Image

import mgjax
from mgjax.inference import decoding, engine, image_urls, serve
from mgjax.inference.generate import conversation_inputs, stop_ids
from tests.helpers import help_text, undocumented


@pytest.fixture(scope="module")
def running(internvl_dir):
    _, path = internvl_dir
    model = mgjax.from_pretrained(path, dtype=jnp.float32)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    service = serve.Service(model, tok, "tiny", max_batch=4, max_prompt_tokens=120, max_tokens=6)
    httpd = serve.server(service, port=0).start()
    client = openai.OpenAI(base_url=f"{httpd.url}/v1", api_key="unused", max_retries=0, timeout=300)
    yield service, client, path
    httpd.stop()


def _png_bytes(path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).save(buf, format="PNG")
    return buf.getvalue()


def _data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(_png_bytes(path)).decode()


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
    before = len(service.engine.occupancy)
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda m: client.chat.completions.create(model="tiny", messages=m), prompts))
    assert max(service.engine.occupancy[before:]) > 1
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
            "--allow-image-urls",
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
        own = f"{client.base_url}".replace("/v1/", "/health")  # --allow-image-urls, but not from this machine
        with pytest.raises(openai.BadRequestError, match="is a loopback address"):
            client.chat.completions.create(model="cli", messages=_messages("what ?", own))
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
    assert "the engine's slots); more wait for a slot to free (default: 8)" in text and "(default: 8000)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


# ------------------------------------------------------------------------------------------- breaking the server
KEY = {"Authorization": "Bearer sesame"}  # the strict server's API key


def _post(port: int, body: bytes, headers: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json", **KEY, **(headers or {})}
    conn.request("POST", "/v1/chat/completions", body, headers)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data) if data else {}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png() -> bytes:
    """A valid 100000 x 100000 PNG header (10^10 pixels) over almost no data."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0"))
        + _png_chunk(b"IEND", b"")
    )


def _bad_chunk_png(path) -> bytes:
    """A real PNG with a text chunk that claims more bytes than the file has."""
    data = _png_bytes(path)
    at = data.index(b"IDAT") - 4
    return data[:at] + struct.pack(">I", 0x7FFFFFF0) + b"tEXtabc" + data[at:]


@pytest.fixture(scope="module")
def strict(running):
    """A second server on the same model with tight transport limits."""
    service, _, path = running
    strict = serve.Service(
        service.model,
        service.tokenizer,
        "tiny",
        max_batch=4,
        max_prompt_tokens=120,
        max_tokens=6,
        max_tokens_limit=64,
        max_body_bytes=4096,
        timeout=1.0,
        api_key="sesame",
    )
    httpd = serve.server(strict, port=0).start()
    yield strict, httpd.port, path
    httpd.stop()


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", "NaN"),
        ("temperature", "3"),
        ("top_p", "0"),
        ("max_tokens", "0"),
        ("max_tokens", str(10**9)),
        ("seed", str(2**70)),
        ("stop", "5"),
        ("stop", '[""]'),
        ("n", "2"),
        ("tools", '[{"type": "function", "function": {"name": "f"}}]'),
        ("stream", '"yes"'),
    ],
)
def test_settings_out_of_range_or_unsupported_are_400s_naming_the_field(strict, field, value):
    """Each once answered 200 with a silent default, 500 for the whole batch, or dropped the connection."""
    _, port, _ = strict
    body = f'{{"model": "tiny", "messages": [{{"role": "user", "content": "hi"}}], "{field}": {value}}}'
    status, reply = _post(port, body.encode())
    assert status == 400 and reply["error"]["param"] == field, reply


def test_bodies_over_the_limit_are_413_unread_and_short_ones_time_out(strict):
    _, port, _ = strict
    start = time.monotonic()
    status, reply = _post(port, b"{}", {"Content-Length": "2000000000"})
    assert status == 413 and "over this server's 4096" in reply["error"]["message"]
    status, _ = _post(port, json.dumps({"model": "tiny", "messages": _messages("x" * 5000)}).encode())
    assert status == 413
    assert time.monotonic() - start < 10
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:  # declares 100 bytes, sends 10
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        start = time.monotonic()
        while s.recv(4096):  # the server gives up after its 1 s timeout and closes; nothing holds a thread
            pass
        assert time.monotonic() - start < 10
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as s,  # an idle connection is closed too
        socket.create_connection(("127.0.0.1", port), timeout=30) as trickle,  # as is one that stops mid-headers
    ):
        trickle.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        assert s.recv(4096) == b""
        assert trickle.recv(4096) == b""


def test_a_prompt_far_over_the_limit_is_refused_before_tokenising(strict, monkeypatch):
    service, port, _ = strict
    big = {"model": "tiny", "messages": _messages("a" * 3000)}
    monkeypatch.setattr(service, "max_body_bytes", 1 << 20)
    monkeypatch.setattr(service, "max_prompt_tokens", 40)  # 2560 characters at most
    monkeypatch.setattr(serve, "conversation_inputs", lambda *a: pytest.fail("tokenised"))
    status, reply = _post(port, json.dumps(big).encode())
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded" and "characters" in str(reply)


def test_a_decompression_bomb_and_a_broken_png_are_400s(running):
    _, client, path = running
    for data, match in ((_bomb_png(), "too large"), (_bad_chunk_png(path / "cat.png"), "does not decode")):
        uri = "data:image/png;base64," + base64.b64encode(data).decode()
        with pytest.raises(openai.BadRequestError, match=match):
            client.chat.completions.create(model="tiny", messages=_messages("what ?", uri))
    assert client.chat.completions.create(model="tiny", messages=_messages("what ?")).choices[0].message is not None


def test_budgets_and_request_counts_share_compiled_programs(running):
    """The engine's step is compiled per cache length alone: a new ``max_tokens`` or number of requests decoding
    together compiles nothing."""
    _, client, _ = running
    client.chat.completions.create(model="tiny", messages=_messages("what ?"), max_tokens=3)
    before = engine._step._cache_size()
    for budget in (4, 5, 7):
        client.chat.completions.create(model="tiny", messages=_messages("what ?"), max_tokens=budget)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda _: client.chat.completions.create(model="tiny", messages=_messages("a cat ?")), range(3)))
    assert engine._step._cache_size() == before


def test_a_client_leaving_mid_stream_stops_its_decoding(running, monkeypatch):
    service, client, _ = running
    port = client.base_url.port
    jobs = []
    submit = service.submit
    monkeypatch.setattr(service, "submit", lambda job: jobs.append(job) or submit(job))
    monkeypatch.setattr(service.engine, "stop_ids", ())  # nothing ends the answer but its 4000-token budget
    body = json.dumps({"model": "tiny", "messages": _messages("what ?"), "max_tokens": 4000, "stream": True})
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        seen = b""
        while b"data: " not in seen:  # the headers, then the first event
            seen += s.recv(4096)
    deadline = time.monotonic() + 60
    while jobs[0].finished is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert jobs[0].finished == "cancelled" and len(jobs[0].tokens) < 4000
    start = time.monotonic()
    client.chat.completions.create(model="tiny", messages=_messages("what ?"), max_tokens=2)
    assert time.monotonic() - start < 30  # the server is free again, not decoding for nobody


def test_many_clients_at_once_are_all_answered(strict):
    _, port, _ = strict

    def models(_):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/v1/models", headers=KEY)
        status = conn.getresponse().status
        conn.close()
        return status

    with ThreadPoolExecutor(64) as pool:
        assert list(pool.map(models, range(64))) == [200] * 64


def test_the_api_key_is_required_where_set(strict):
    service, port, _ = strict
    body = json.dumps({"model": "tiny", "messages": _messages("what ?"), "max_tokens": 2}).encode()
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
        status, reply = _post(port, body, headers)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/v1/models")
    assert conn.getresponse().status == 401
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sesame", max_retries=0, timeout=300)
    assert client.chat.completions.create(model="tiny", messages=_messages("what ?"), max_tokens=2).choices


def test_health_and_prometheus_metrics(strict):
    service, port, _ = strict
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sesame", max_retries=0, timeout=300)
    client.chat.completions.create(model="tiny", messages=_messages("what ?"), max_tokens=2)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/health")  # open without the key
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read()) == {"status": "ok", "model": "tiny"}
    conn.request("GET", "/metrics")
    r = conn.getresponse()
    text = r.read().decode()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/plain")
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert values['mgjax_requests_total{status="200"}'] >= 1 and values["mgjax_generated_tokens_total"] >= 1
    assert values["mgjax_time_to_first_token_seconds_count"] >= 1 and values["mgjax_request_seconds_count"] >= 1
    assert values["mgjax_queue_depth"] == 0 and values["mgjax_prompt_tokens_total"] > 0


def test_text_completions_equal_greedy_decoding_of_the_raw_prompt(running):
    """``/v1/completions``: the prompt as it is (no template), plain and streamed; unsupported options are 400s."""
    service, client, _ = running
    prompt = "a red cat is"
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=5)
    ids = jnp.asarray([service.tokenizer(prompt)["input_ids"]], jnp.int32)
    stops = stop_ids(service.tokenizer, "Hermes-2")
    out = np.asarray(decoding.greedy(service.model.language_model, ids, 5, stop_ids=stops))
    want = service.tokenizer.decode(decoding.cut(out[0, ids.shape[1] :].tolist(), stops), skip_special_tokens=True)
    assert reply.object == "text_completion" and reply.choices[0].text == want
    assert reply.usage.prompt_tokens == ids.shape[1] and reply.usage.completion_tokens <= 5
    chunks = list(client.completions.create(model="tiny", prompt=[prompt], max_tokens=5, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    for bad in ({"echo": True}, {"best_of": 2}, {"logprobs": 2}):
        with pytest.raises(openai.BadRequestError, match="not supported"):
            client.completions.create(model="tiny", prompt=prompt, max_tokens=2, **bad)
    with pytest.raises(openai.BadRequestError, match="prompt must be"):
        client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=2)


def test_lmms_eval_openai_compatible_requests(running):
    """The requests lmms-eval's ``openai_compatible`` model sends (its ``generate_until``): one user message, the
    text first and then each image as a PNG data URI, ``max_tokens`` and ``temperature`` 0, a batch of them at once
    through ``AsyncOpenAI``. Each answer equals greedy decoding of the same message alone."""
    import asyncio

    service, client, path = running
    png = base64.b64encode(_png_bytes(path / "cat.png")).decode()

    def payload(text, image):
        content = [{"type": "text", "text": text}]
        content += [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}] if image else []
        return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0}

    payloads = [payload("what is this ?", True), payload("a red cat ?", False), payload("is this a cat ?", True)]

    async def ask_all():
        async with openai.AsyncOpenAI(base_url=str(client.base_url), api_key="unused", max_retries=0) as aclient:
            replies = await asyncio.gather(*(aclient.chat.completions.create(**p) for p in payloads))
        return [r.choices[0].message.content for r in replies]

    assert asyncio.run(ask_all()) == [_greedy(service, p["messages"]) for p in payloads]


def test_the_models_list_with_the_key(strict):
    _, port, _ = strict
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/v1/models", headers=KEY)
    r = conn.getresponse()
    assert r.status == 200 and [m["id"] for m in json.loads(r.read())["data"]] == ["tiny"]
    conn.request("GET", "/v1/nothing", headers=KEY)  # unknown routes: 404 in the same error shape
    r = conn.getresponse()
    assert r.status == 404 and json.loads(r.read())["error"]["code"] == "not_found"


def _raw(port: int, request: bytes) -> tuple[int, dict]:
    """One request sent whole through a socket, the response read to the connection's end: (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_chunked_bodies_are_counted_and_a_body_needs_a_length(strict):
    _, port, _ = strict
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sesame\r\nConnection: close\r\n"
    chunked = head + b"Transfer-Encoding: chunked\r\n\r\n"
    status, reply = _raw(port, chunked + b"1000\r\n" + b"x" * 4096 + b"\r\n" + b"10\r\n" + b"y" * 16 + b"\r\n0\r\n\r\n")
    assert status == 413 and "over this server's 4096" in reply["error"]["message"]
    body = json.dumps({"model": "gpt-4", "messages": _messages("hi")}).encode()  # read whole, then refused by model
    status, reply = _raw(port, chunked + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
    assert status == 404 and reply["error"]["code"] == "model_not_found"
    status, reply = _raw(port, head + b"\r\n")
    assert status == 411 and reply["error"]["code"] == "length_required"


# ----------------------------------------------------------------------------------------------------- image URLs
@pytest.fixture(scope="module")
def image_server(internvl_dir):
    """A local HTTP server: ``/cat.png`` (the test image), ``/to-cat`` (a redirect to it), ``/to-metadata`` (a
    redirect to a cloud's link-local metadata address); ``(base URL, the paths asked for)``."""
    _, path = internvl_dir
    png, asked = _png_bytes(path / "cat.png"), []

    class Images(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            asked.append(self.path)
            location = {"/to-cat": "/cat.png", "/to-metadata": "http://169.254.169.254/latest/meta-data/"}
            if self.path in location:
                self.send_response(302)
                self.send_header("Location", location[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", asked
    httpd.shutdown()


def test_image_urls_are_refused_without_the_flags(running, image_server, monkeypatch):
    service, client, _ = running
    base, asked = image_server
    with pytest.raises(openai.BadRequestError, match="only data: URIs .* --allow-image-urls"):
        client.chat.completions.create(model="tiny", messages=_messages("what ?", f"{base}/cat.png"))
    monkeypatch.setattr(service, "allow_image_urls", True)  # and still not from this machine
    with pytest.raises(openai.BadRequestError, match="'127.0.0.1' is a loopback address") as refused:
        client.chat.completions.create(model="tiny", messages=_messages("what ?", f"{base}/cat.png"))
    assert refused.value.body["param"] == "messages[0].content[0]"
    with pytest.raises(openai.BadRequestError, match="must be a data: URI or an http"):
        client.chat.completions.create(model="tiny", messages=_messages("what ?", "file:///etc/passwd"))
    assert asked == []  # nothing was fetched


def test_image_urls_with_both_flags_answer_as_data_uris(running, image_server, monkeypatch):
    service, client, path = running
    base, _ = image_server
    monkeypatch.setattr(service, "allow_image_urls", True)
    monkeypatch.setattr(service, "allow_private_image_urls", True)
    images = [_data_uri(path / "cat.png"), f"{base}/cat.png", f"{base}/to-cat"]  # the last one redirected
    ask = lambda image: client.chat.completions.create(model="tiny", messages=_messages("what ?", image))  # noqa: E731
    with ThreadPoolExecutor(3) as pool:  # decoded in one batch
        answers = [r.choices[0].message.content for r in pool.map(ask, images)]
    assert answers == [answers[0]] * 3


def test_a_redirect_to_a_private_address_is_refused(running, image_server, monkeypatch):
    service, client, _ = running
    base, asked = image_server
    monkeypatch.setattr(service, "allow_image_urls", True)
    local = ipaddress.ip_address("127.0.0.1")  # the image server stands in for a public one
    check = image_urls._not_public
    monkeypatch.setattr(image_urls, "_not_public", lambda a: None if a == local else check(a))
    with pytest.raises(openai.BadRequestError, match="'169.254.169.254' is a link-local address"):
        client.chat.completions.create(model="tiny", messages=_messages("what ?", f"{base}/to-metadata"))
    assert asked[-1] == "/to-metadata"
