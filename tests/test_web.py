"""``python -m mgjax.web``: its page driven in a real headless browser (Debian's Chromium through Playwright) against
the server on a tiny InternVL2: an uploaded image and a question give the answer the API gives (greedy), streamed
in pieces; a follow-up carries the conversation; Stop cancels the decoding on the server; New chat forgets; a
refusal is shown. Then MGM's image path: the key asked for, ``<GEN>`` sent, and the ``<h>…</h>`` prompt drawn
below the answer through ``/v1/images/generations`` (a stub drawer: the pipeline itself is tests/test_imagegen.py's).
The browser tests skip, saying so, where no Chromium is installed (CI installs it: .ci/run)."""

import base64
import io
import json
import re
import shutil
import threading
import time
import urllib.error
import urllib.request

import jax.numpy as jnp
import pytest
import transformers
from PIL import Image
from playwright.sync_api import expect, sync_playwright

import mgjax
from mgjax.inference import serve, web
from tests.helpers import help_text, undocumented

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# headless, and nothing of Chromium's own traffic (updates, sync, QUIC probes): this machine's network is closed
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LIMIT = 50  # the servers' --max-tokens-limit
BUDGET = 20  # their --max-tokens: the tiny model's first dozen tokens with cat.png decode to nothing
KEY = "sesame"  # the drawing server's --api-key
# each update of an answer's text on the page, counted (one per streamed piece)
COUNT_UPDATES = """() => {
  window.updates = 0;
  new MutationObserver((records) => {
    for (const r of records) if (r.target.matches && r.target.matches(".assistant .text")) window.updates += 1;
  }).observe(document.getElementById("log"), {childList: true, subtree: true});
}"""


@pytest.fixture(scope="module")
def tiny(internvl_dir):
    """The tiny InternVL2, its tokenizer given a word for each id past its 21 (a random model's answer would
    otherwise decode to nothing, and nothing streams); prompts tokenise as before."""
    _, path = internvl_dir
    model = mgjax.from_pretrained(path, dtype=jnp.float32)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    tok.add_tokens([f"w{i}" for i in range(len(tok), model.language_model.config.vocab_size)])
    return model, tok, path


def _serve(model, tok, draw=None, **kw):
    service = serve.Service(
        model, tok, "tiny", max_batch=2, max_prompt_tokens=200, max_tokens=BUDGET, max_tokens_limit=LIMIT, **kw
    )
    return service, web.server(service, port=0, draw=draw).start()


@pytest.fixture(scope="module")
def chat_server(tiny):
    model, tok, path = tiny
    service, httpd = _serve(model, tok)
    yield service, httpd, path
    httpd.stop()


class StubDrawer:
    """A ``TextToImage`` that paints a 24x16 red image and remembers each prompt and the thread that drew it."""

    def __init__(self):
        self.prompts, self.threads = [], []

    def __call__(self, prompt):
        self.prompts.append(prompt)
        self.threads.append(threading.current_thread())
        return Image.new("RGB", (24, 16), "red")


@pytest.fixture(scope="module")
def draw_server(tiny):
    model, tok, _ = tiny
    drawer = StubDrawer()
    _, httpd = _serve(model, tok, draw=drawer, api_key=KEY)
    yield drawer, httpd
    httpd.stop()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium executable: apt-get install chromium (Debian's; .ci/run installs it)")
    with sync_playwright() as p:
        # a fresh temporary profile per launch (Playwright's own user-data dir); `playwright install` is not needed
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 900, "height": 760})
    page = context.new_page()
    page.set_default_timeout(120_000)  # the first answer compiles the prefill and the decoding step
    yield page
    context.close()


class Slow:
    """The engine's observer (the server's metrics), 0.15 s slower a token, noting each request's end."""

    def __init__(self, inner):
        self.inner, self.ended = inner, []

    def first_token(self, seconds):
        self.inner.first_token(seconds)

    def token(self):
        self.inner.token()
        time.sleep(0.15)

    def finished(self, job):
        self.ended.append(job)
        self.inner.finished(job)


def _post(url, path, body, key=None):
    """(status, JSON) of a POST to the server."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url + path, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def _api_answer(httpd, messages) -> str:
    """What the API answers to ``messages`` with the page's default settings: greedy, ``BUDGET`` tokens."""
    status, reply = _post(httpd.url, "/v1/chat/completions", {"model": "tiny", "messages": messages, "temperature": 0})
    assert status == 200, reply
    return reply["choices"][0]["message"]["content"]


def _answered(page, n: int) -> str:
    """The text of the n-th answer, once it and every answer before it are complete."""
    page.wait_for_function(
        f"() => document.querySelectorAll('.msg.assistant:not(.streaming)').length === {n}"
        " && !document.body.classList.contains('busy')"
    )
    return page.locator(".msg.assistant .text").nth(n - 1).text_content()


def _chat_requests(page) -> list[dict]:
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    return bodies


def test_the_page_chats_about_an_image_streamed_stopped_and_reset(chat_server, page):
    service, httpd, path = chat_server
    sent = _chat_requests(page)
    page.goto(httpd.url + "/")
    assert page.text_content("#model") == "tiny" and page.input_value("#max-tokens") == str(BUDGET)
    assert page.is_hidden("#key-label") and page.is_hidden("#gen-label")  # no key, no drawing on this server

    # an image and a question: the answer is the API's own, streamed into the page piece by piece
    page.set_input_files("#image", str(path / "cat.png"))
    expect(page.locator("#preview")).to_be_visible()
    page.evaluate(COUNT_UPDATES)
    page.fill("#prompt", "what is this ?")
    page.click("#send")
    first = _answered(page, 1)
    image = "data:image/png;base64," + base64.b64encode((path / "cat.png").read_bytes()).decode()
    asked = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "what is this ?"}],
        }
    ]
    assert sent[0] == {"model": "tiny", "messages": asked, "stream": True, "temperature": 0, "max_tokens": BUDGET}
    assert first and first == _api_answer(httpd, asked)
    assert page.evaluate("window.updates") > 1, "the answer arrived in one piece"
    assert page.locator(".msg.user img.attached").count() == 1 and page.is_hidden("#attachment")

    # a follow-up (Enter sends): the whole conversation goes with it, the image still on its first message
    page.evaluate(COUNT_UPDATES)
    page.fill("#prompt", "a red cat ?")
    page.press("#prompt", "Enter")
    second = _answered(page, 2)
    conversation = [
        *asked,
        {"role": "assistant", "content": first},
        {"role": "user", "content": [{"type": "text", "text": "a red cat ?"}]},
    ]
    assert sent[1]["messages"] == conversation
    assert second and second == _api_answer(httpd, conversation) and page.evaluate("window.updates") > 1

    # the server's refusal is shown, and the message stays to be sent again
    page.fill("#max-tokens", str(LIMIT + 1))
    page.fill("#prompt", "what ?")
    page.click("#send")
    expect(page.locator("#error")).to_have_text(f"max_tokens must be an integer in [1, {LIMIT}], not {LIMIT + 1}")
    assert page.locator(".msg.assistant").count() == 2 and page.input_value("#prompt") == "what ?"

    # Stop: the browser drops the stream and the server cancels the decoding (slowed here, 0.15 s a token)
    observe = service.engine.observe
    service.engine.observe = slow = Slow(observe)
    try:
        page.fill("#max-tokens", str(LIMIT))
        page.click("#send")
        expect(page.locator("#error")).to_be_hidden()
        expect(page.locator(".msg.assistant .text").nth(2)).not_to_have_text("")
        page.click("#stop")
        expect(page.locator(".msg.assistant").nth(2)).to_have_class(re.compile(r"\bstopped\b"))
        deadline = time.monotonic() + 30
        while not slow.ended and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        service.engine.observe = observe
    assert slow.ended and slow.ended[0].finished == "cancelled" and len(slow.ended[0].tokens) < LIMIT
    assert sent[-1]["max_tokens"] == LIMIT and len(sent[-1]["messages"]) == 5

    # New chat: nothing on the page, and the next question goes alone
    page.click("#reset")
    assert page.locator("#log > *").count() == 0 and page.input_value("#prompt") == ""
    page.fill("#max-tokens", str(BUDGET))
    page.fill("#prompt", "what is this ?")
    page.click("#send")
    alone = [{"role": "user", "content": [{"type": "text", "text": "what is this ?"}]}]
    assert _answered(page, 1) == _api_answer(httpd, alone) and sent[-1]["messages"] == alone


def test_the_image_route_draws_off_the_event_loop_and_exists_only_with_a_drawer(draw_server, chat_server):
    drawer, httpd = draw_server
    ask = {"prompt": " a red cat ", "response_format": "b64_json"}
    assert _post(httpd.url, "/v1/images/generations", ask)[0] == 401
    status, reply = _post(httpd.url, "/v1/images/generations", ask, KEY)
    assert status == 200 and reply["data"][0]["revised_prompt"] == "a red cat"
    assert Image.open(io.BytesIO(base64.b64decode(reply["data"][0]["b64_json"]))).size == (24, 16)
    assert drawer.prompts[-1] == "a red cat" and drawer.threads[-1] is not httpd.thread  # a worker, not the loop's
    for bad, param in [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": "x", "response_format": "url"}, "response_format"),
    ]:
        status, reply = _post(httpd.url, "/v1/images/generations", bad, KEY)
        assert status == 400 and reply["error"]["param"] == param, reply
    request = urllib.request.Request(
        httpd.url + "/v1/images/generations",
        json.dumps(ask).encode(),
        {"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"},
    )
    with pytest.raises(urllib.error.HTTPError, match="415"):  # a form's body: not from another site's page
        urllib.request.urlopen(request, timeout=60)
    _, plain, _ = chat_server
    status, reply = _post(plain.url, "/v1/images/generations", ask)
    assert status == 404 and reply["error"]["code"] == "not_found"


def test_the_page_asks_for_the_key_and_draws_the_answers_image_prompt(draw_server, page):
    drawer, httpd = draw_server
    page.goto(httpd.url + "/")
    expect(page.locator("#key-label")).to_be_visible()
    expect(page.locator("#gen-label")).to_be_visible()
    page.fill("#prompt", "draw a red cat")
    page.click("#send")
    expect(page.locator("#error")).to_contain_text("a valid API key is required")

    # the model's answer stands in for MGM's: a random model writes no <h>…</h>
    seen = []

    def answer(route):
        seen.append((route.request.headers.get("authorization"), route.request.post_data_json))
        events = [
            {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            for piece in ("Sure. ", "<h>a red cat</h>")
        ]
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)

    page.route("**/v1/chat/completions", answer)
    page.fill("#api-key", KEY)
    page.check("#gen")
    page.click("#send")
    assert _answered(page, 1) == "Sure. <h>a red cat</h>"
    drawn = page.locator(".msg.assistant .drawn img")
    expect(drawn).to_be_visible()
    assert page.evaluate("document.querySelector('.drawn img').naturalWidth") == 24
    assert page.text_content(".drawn figcaption") == "a red cat" and drawer.prompts[-1] == "a red cat"
    key, body = seen[0]
    assert key == f"Bearer {KEY}" and body["messages"][-1]["content"] == [
        {"type": "text", "text": "draw a red cat <GEN>"}
    ]
    expect(page.locator("#error")).to_be_hidden()


def test_the_command_takes_every_server_flag_and_refuses_drawing_for_other_models(tiny, tmp_path, capsys, monkeypatch):
    _, _, path = tiny
    assert undocumented(web.parser()) == []
    mine = {s for a in web.parser()._actions for s in a.option_strings}
    assert {s for a in serve.parser()._actions for s in a.option_strings} <= mine and "--sd-model" in mine
    assert "python -m mgjax.web" in help_text(web.main, [], capsys)
    assert web.main(["--model", str(path), "--dtype", "float32", "--sd-model", str(tmp_path)]) == 2
    assert "--sd-model: only MGM models write image prompts" in capsys.readouterr().err
    served = []
    monkeypatch.setattr(serve.Server, "run", lambda self: served.append(self))  # built and bound, not run
    argv = ["--model", str(path), "--dtype", "float32", "--port", "0", "--api-key", KEY, "--name", "cli"]
    assert web.main(argv) == 0
    (httpd,) = served
    assert capsys.readouterr().out.startswith(f"serving cli on {httpd.url}/ (the page) and {httpd.url}/v1")
    routes = {r.path for r in httpd.uvicorn.config.app.routes}
    assert {"/", "/v1/chat/completions"} <= routes and "/v1/images/generations" not in routes
    httpd.socket.close()
