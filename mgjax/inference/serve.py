"""``python -m mgjax.serve --model DIR``: an OpenAI-compatible server (``POST /v1/chat/completions``, ``POST
/v1/completions`` for raw text prompts, ``GET /v1/models``, ``/health``, ``/metrics``) for any converted model,
with images as ``image_url`` data URIs (or http(s) URLs, when allowed), streaming (server-sent events) and
concurrent requests decoded together. A Starlette app served by uvicorn (its pure-Python h11 protocol): one event
loop holds every connection; the continuous-batching engine (``mgjax.inference.engine``) decodes in its own thread.

A request joins the running batch at the next decoding step, in one of ``--max-batch`` slots (it waits only for
a free slot), and leaves when it ends at its own ``max_tokens``, stop tokens or ``stop`` strings; each row has
its own sampling settings. A bad request (unknown model,
malformed messages, an image that does not decode, a URL of a scheme or address the server does not fetch, a
prompt over ``--max-prompt-tokens``) gets a 4xx error in OpenAI's format and the server goes on; so does one whose
settings are out of range (``temperature`` NaN or over 2, ``top_p`` 0, ``max_tokens`` 0 or over
``--max-tokens-limit``, a 2^70 seed, a ``stop`` that is not strings) or unsupported (``n`` > 1, ``tools``), and a
prompt far over the limit (refused before tokenising).

The transport: a body declared over ``--max-body-bytes`` gets a 413 unread (and its connection closed); a chunked
body is accepted and counted as it arrives (413 at the limit); a body with neither Content-Length nor chunked
encoding gets a 411; a body that has not arrived whole within ``--timeout`` seconds gets a 408 and its connection
closed. A connection idle (nothing sent, or headers sent in part) for ``--timeout`` seconds is closed, as is one
whose client stops reading an answer for that long. A client that leaves cancels its request's decoding, streamed
or not, noticed at once even while nothing is written to it.

Image URLs: ``data:`` always; ``http:`` and ``https:`` only with ``--allow-image-urls``, and then only from public
addresses (the host is resolved once, every address checked, and the connection made to a checked one, so a DNS
answer that changes cannot redirect it), each redirect checked the same way, at most ``--max-body-bytes`` and
``--timeout`` seconds; ``--allow-private-image-urls`` lifts the address check (tests, trusted networks). Every
other scheme (``file:`` ...) is refused. A system message is put before the first user message's text: the
templates fix their own system prompt. Nothing is downloaded but the image URLs a server allows.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import io
import json
import math
import os
import queue
import socket
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import prometheus_client
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from mgjax.cli import HelpFormatter, compilation_cache, integer, number
from mgjax.data import preprocess, templates
from mgjax.inference import decoding, engine, image_urls
from mgjax.inference.engine import Job
from mgjax.inference.generate import (
    TEMPLATE_HELP,
    add_model_arguments,
    batch_embeds,
    conversation_inputs,
    default_template,
    load_model,
    stop_ids,
)

# capacity defaults, shared with ``python -m mgjax.plan --serve``: slots, the longest prompt, the largest answer budget
MAX_BATCH, MAX_PROMPT_TOKENS, MAX_TOKENS_LIMIT = 8, 4096, 4096


class RequestError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


Fetch = Callable[[str, str], bytes]  # (url, where in the request) -> the image's bytes


def _image(url: str, where: str, exif_transpose: bool, fetch: Fetch | None = None) -> Image.Image:
    data = _image_bytes(url, where, fetch)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return preprocess.rgb(img, exif_transpose=exif_transpose, where=where)
    except Image.DecompressionBombError as e:
        raise RequestError(400, f"{where}: the image is too large to decode ({e})", param=where) from None
    except Exception as e:  # noqa: BLE001  (PIL raises many types on damaged files: struct.error, EOFError, ...)
        raise RequestError(400, f"{where}: the image does not decode ({type(e).__name__}: {e})", param=where) from None


def _image_bytes(url: str, where: str, fetch: Fetch | None) -> bytes:
    """The encoded image an ``image_url`` names: a data URI's payload, or an http(s) URL's body through ``fetch``
    (None: this server fetches nothing). No other scheme is ever read: ``file:`` would hand out the server's files."""
    scheme = url.partition(":")[0].lower()
    if scheme == "data":
        return _data_uri(url, where)
    if scheme in ("http", "https") and fetch is not None:
        return fetch(url, where)
    if fetch is None:
        raise RequestError(
            400, f"{where}: only data: URIs are accepted (http(s) URLs need --allow-image-urls)", param=where
        )
    raise RequestError(400, f"{where}: the image must be a data: URI or an http(s) URL, not {url[:40]!r}", param=where)


def _data_uri(url: str, where: str) -> bytes:
    head, _, payload = url.partition(",")
    if not head.endswith(";base64"):
        return payload.encode()
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as e:
        raise RequestError(400, f"{where}: the image does not decode (its base64: {e})", param=where) from None


def conversation(messages: Any, exif_transpose: bool = False, fetch: Fetch | None = None) -> tuple[list[dict], list]:
    """OpenAI messages -> (template turns, images in order). Text parts keep their order; each image part becomes
    an ``<image>`` placeholder where it stands. ``fetch`` reads http(s) image URLs (None: they are refused)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list", param="messages")
    turns, images, system = [], [], []
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if role not in ("system", "user", "assistant") or not isinstance(parts, list):
            raise RequestError(
                400, f"messages[{i}]: needs a role (system, user, assistant) and a content", param=f"messages[{i}]"
            )
        text = []
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                text.append(part["text"])
            elif kind == "image_url" and role == "user":
                url = part.get("image_url", {})
                images.append(
                    _image(
                        url.get("url", "") if isinstance(url, dict) else str(url),
                        f"messages[{i}].content[{j}]",
                        exif_transpose,
                        fetch,
                    )
                )
                text.append(templates.IMAGE + "\n")
            else:
                raise RequestError(400, f"messages[{i}].content[{j}]: unsupported part", param=f"messages[{i}]")
        if role == "system":
            system.append("".join(text))
            continue
        turns.append({"from": "human" if role == "user" else "gpt", "value": "".join(text)})
    if not turns or turns[-1]["from"] != "human":
        raise RequestError(400, "the last message must be the user's", param="messages")
    if system:
        turns[0] = {**turns[0], "value": "\n".join(system) + "\n\n" + turns[0]["value"]}
    return turns, images


# fields this server does not implement, with the values that ask for nothing (accepted)
UNSUPPORTED = {
    name: (None, [], {})
    for name in ("tools", "tool_choice", "functions", "function_call", "logit_bias", "audio", "modalities")
}
TEXT_UNSUPPORTED = {"echo": (None, False), "best_of": (None, 1), "suffix": (None, ""), "logprobs": (None,)}
CHARS_PER_TOKEN = 64  # a prompt longer than this many characters per allowed token is refused untokenised
MAX_STOPS = 4  # OpenAI's limit


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(400, f"{name} must be a number, not {value!r}", param=name)
    if value < lo or value > hi or (lo_open and value == lo):
        raise RequestError(
            400, f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], not {value!r}", param=name
        )
    return float(value)


def _integer(body: dict, name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RequestError(400, f"{name} must be an integer in [{lo}, {hi}], not {value!r}", param=name)
    return value


def _refuse(body: dict, unsupported: dict[str, tuple]) -> None:
    """A 400 for the first field of ``unsupported`` that asks for something (a value not among its accepted)."""
    for name, accepted in unsupported.items():
        if body.get(name) not in accepted:
            raise RequestError(400, f"{name} is not supported by this server", param=name)


def settings(body: dict, max_tokens_limit: int, default_max_tokens: int) -> tuple[decoding.Sampling, int, list[str]]:
    """A request's sampling, answer budget and stop strings, each checked: what is out of range or unsupported is
    a 400 naming the field, never a silent default (``max_tokens: 0``, ``top_p: 0``) or a failure mid-batch."""
    _refuse(body, UNSUPPORTED)
    if _integer(body, "n", 1, 1 << 31) not in (None, 1):
        raise RequestError(400, "n: only one choice per request is supported", param="n")
    if not isinstance(body.get("stream", False), bool):
        raise RequestError(400, "stream must be true or false", param="stream")
    sampling = decoding.Sampling(
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=_integer(body, "seed", -(1 << 63), (1 << 63) - 1) or 0,
    )
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    budget = _integer(body, name, 1, max_tokens_limit)
    stops = body.get("stop")
    stops = [] if stops is None else [stops] if isinstance(stops, str) else stops
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(x, str) and x for x in stops):
        raise RequestError(
            400, f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings", param="stop"
        )
    return sampling, default_max_tokens if budget is None else budget, stops


def _check_text_length(messages: Any, max_prompt_tokens: int) -> None:
    """Refuse a prompt far over the token limit before tokenising it (a 19 MB prompt once took the server down)."""
    if not isinstance(messages, list):
        return
    chars = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        parts = [content] if isinstance(content, str) else content if isinstance(content, list) else []
        chars += sum(
            len(p) if isinstance(p, str) else len(str(p.get("text", ""))) for p in parts if isinstance(p, (str, dict))
        )
    if chars > CHARS_PER_TOKEN * max_prompt_tokens:
        raise RequestError(
            400,
            f"the prompt has {chars} characters, more than {CHARS_PER_TOKEN} per token of this server's "
            f"{max_prompt_tokens}-token limit",
            code="context_length_exceeded",
            param="messages",
        )


class Metrics:
    """What ``/metrics`` exposes (Prometheus' text format), in a registry of the service's own."""

    def __init__(self):
        self.registry = prometheus_client.CollectorRegistry()
        kw = dict(registry=self.registry, namespace="mgjax")
        self.requests = prometheus_client.Counter(
            "requests", "chat requests answered, by HTTP status", ["status"], **kw
        )
        self.prompt_tokens = prometheus_client.Counter("prompt_tokens", "prompt tokens of accepted requests", **kw)
        self.tokens = prometheus_client.Counter("generated_tokens", "tokens decoded for requests", **kw)
        self.queue = prometheus_client.Gauge("queue_depth", "requests waiting for or in decoding", **kw)
        buckets = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.first_token = prometheus_client.Histogram(
            "time_to_first_token_seconds", "from a request's arrival to its first decoded token", buckets=buckets, **kw
        )
        self.latency = prometheus_client.Histogram(
            "request_seconds", "from a request's arrival to its last token", buckets=buckets, **kw
        )

    def text(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


class _Observer:
    """The engine's events as the server's metrics."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def first_token(self, seconds: float) -> None:
        self.metrics.first_token.observe(seconds)

    def token(self) -> None:
        self.metrics.tokens.inc()

    def finished(self, job: Job) -> None:
        self.metrics.latency.observe(time.monotonic() - job.submitted)
        self.metrics.queue.dec()


class Service:
    """Requests -> jobs: validation, prompts, and the OpenAI response shapes."""

    def __init__(
        self,
        model,
        tokenizer,
        name: str,
        *,
        template: str | None = None,
        max_batch: int = MAX_BATCH,
        max_prompt_tokens: int = MAX_PROMPT_TOKENS,
        max_tokens: int = 512,
        max_tokens_limit: int = MAX_TOKENS_LIMIT,
        max_body_bytes: int = 32 << 20,
        timeout: float = 60.0,
        exif_transpose: bool = False,
        api_key: str | None = None,
        allow_image_urls: bool = False,
        allow_private_image_urls: bool = False,
    ):
        if max_tokens > max_tokens_limit:
            raise ValueError(f"--max-tokens {max_tokens} is over --max-tokens-limit {max_tokens_limit}")
        if allow_private_image_urls and not allow_image_urls:
            raise ValueError("--allow-private-image-urls needs --allow-image-urls")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.exif_transpose = exif_transpose
        self.template = template or default_template(model, tokenizer)
        self.max_prompt_tokens, self.default_max_tokens = max_prompt_tokens, max_tokens
        self.max_tokens_limit, self.max_body_bytes, self.timeout = max_tokens_limit, max_body_bytes, timeout
        self.api_key = api_key
        self.allow_image_urls, self.allow_private_image_urls = allow_image_urls, allow_private_image_urls
        self.metrics = Metrics()
        self.engine = engine.Engine(
            model,
            tokenizer,
            stop_ids(tokenizer, self.template),
            slots=max_batch,
            observe=_Observer(self.metrics),
            embed=lambda m, ids, args: batch_embeds(m, ids, [args]) if args else None,
        )

    def _settings(self, body: Any):
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        if body.get("model") != self.name:
            raise RequestError(
                404,
                f"model {body.get('model')!r} does not exist; this server has {self.name!r}",
                code="model_not_found",
                param="model",
            )
        return settings(body, self.max_tokens_limit, self.default_max_tokens)

    def _check_prompt_tokens(self, n: int, param: str) -> None:
        if n > self.max_prompt_tokens:
            raise RequestError(
                400,
                f"the prompt has {n} tokens, more than this server's {self.max_prompt_tokens}",
                code="context_length_exceeded",
                param=param,
            )

    def job(self, body: Any) -> Job:
        """A chat completion's job (``/v1/chat/completions``): the messages through the model's template."""
        sampling, budget, stops = self._settings(body)
        _check_text_length(body.get("messages"), self.max_prompt_tokens)
        fetch = self._fetch if self.allow_image_urls else None
        turns, images = conversation(body.get("messages"), self.exif_transpose, fetch)
        try:
            ids, image_args = conversation_inputs(self.model, self.tokenizer, self.template, turns, images)
        except (ValueError, TypeError) as e:
            raise RequestError(400, str(e)) from None
        self._check_prompt_tokens(ids.shape[1], "messages")
        return Job(ids[0], image_args, sampling, budget, stops)

    def _fetch(self, url: str, where: str) -> bytes:
        try:
            return image_urls.fetch_image(
                url, where, limit=self.max_body_bytes, timeout=self.timeout, private=self.allow_private_image_urls
            )
        except image_urls.Refused as e:
            raise RequestError(400, str(e), param=where) from None

    def text_job(self, body: Any) -> Job:
        """A text completion's job (``/v1/completions``): the prompt as it is, no template, no images."""
        sampling, budget, stops = self._settings(body)
        _refuse(body, TEXT_UNSUPPORTED)
        prompt = body.get("prompt")
        prompt = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 else prompt
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, "prompt must be a non-empty string (one per request)", param="prompt")
        _check_text_length([{"content": prompt}], self.max_prompt_tokens)
        ids = np.asarray(self.tokenizer(prompt)["input_ids"], np.int32)
        self._check_prompt_tokens(len(ids), "prompt")
        return Job(ids, {}, sampling, budget, stops, chat=False)

    def submit(self, job: Job) -> Job:
        self.metrics.queue.inc()
        self.metrics.prompt_tokens.inc(len(job.ids))
        return self.engine.submit(job)

    def authorise(self, header: str | None) -> None:
        """Check ``Authorization: Bearer KEY`` when the server has a key (compared in constant time)."""
        if self.api_key is None:
            return
        scheme, _, given = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise RequestError(401, "a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key")

    def chunk(self, rid: str, job: Job, piece: str | None, finish: str | None = None) -> dict:
        """A streamed event: a piece of text (None: the chat's opening role) or, with ``finish``, the end."""
        if job.chat:
            delta = {"role": "assistant", "content": ""} if piece is None and finish is None else {}
            choice = {"index": 0, "delta": {"content": piece} if piece else delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
        return {**self._head(rid, job, ".chunk"), "choices": [choice]}

    def completion(self, rid: str, job: Job, text: str, finish: str, used: int) -> dict:
        if job.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {
            **self._head(rid, job, ""),
            "choices": [choice],
            "usage": {"prompt_tokens": len(job.ids), "completion_tokens": used, "total_tokens": len(job.ids) + used},
        }

    def _head(self, rid: str, job: Job, suffix: str) -> dict:
        kind = "chat.completion" + suffix if job.chat else "text_completion"
        return {"id": rid, "object": kind, "created": int(time.time()), "model": self.name}


class ClientGone(Exception):
    """The client closed its connection before its answer was complete."""


class _Outbox(queue.Queue):
    """``Job.out`` for a request answered on the event loop. The decoding thread puts into it as into any queue;
    each item is handed to the loop (``call_soon_threadsafe``), where the request awaits ``items``: no thread
    waits per request, and the loop never blocks on the decoder."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__()
        self.loop, self.items = loop, asyncio.Queue()

    def _put(self, item) -> None:  # queue.Queue's storage hook, run by put and put_nowait alike
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server stopped, and nobody waits for this answer
            pass


async def _answer(job: Job, receive, piece: Callable[[str], Awaitable[None]]) -> tuple[str, int]:
    """Await the job's text, handing each piece to ``piece``; its (finish reason, completion tokens) at the end.
    Leaving early cancels the job, so the decoder stops spending steps on it: the client gone (``ClientGone``), a
    write failed, the server stopping (this coroutine cancelled)."""
    watcher = asyncio.create_task(_watch(receive, job.out))
    try:
        while True:
            item = await job.out.items.get()
            if isinstance(item, ClientGone):  # the watcher's
                raise item
            if isinstance(item, Exception):  # the engine's: decoding failed
                raise RequestError(500, str(item), code="server_error")
            if isinstance(item, tuple):
                return item
            await piece(item)
    except BaseException:
        job.cancel()
        raise
    finally:
        watcher.cancel()


async def _watch(receive, out: _Outbox) -> None:
    """Wake the request with ``ClientGone`` when its client leaves. Its body is read, so the next thing uvicorn's
    ``receive`` reports is the connection closing: at once, even while nothing is being written to it."""
    while (await receive())["type"] != "http.disconnect":
        pass
    out.items.put_nowait(ClientGone())


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request's body. Content-Length or chunked encoding (each accepted); a declared length over ``limit`` is
    refused unread (413), a chunked body at the limit as it arrives; a body not whole within ``timeout`` seconds,
    shorter than declared or merely slow, is a 408."""
    declared = request.headers.get("content-length")
    if declared is None and "chunked" not in request.headers.get("transfer-encoding", "").lower():
        raise RequestError(411, "a Content-Length header (or a chunked body) is required", code="length_required")
    if declared is not None and int(declared) > limit:  # h11 let only digits through
        raise RequestError(413, f"the body has {declared} bytes, over this server's {limit}", code="too_large")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise RequestError(413, f"the body is over this server's {limit} bytes", code="too_large")
    except TimeoutError:
        raise RequestError(408, f"the body did not arrive whole within {timeout:g} s", code="timeout") from None
    except ClientDisconnect:
        raise ClientGone from None
    return bytes(body)


def parse(make: Callable[[Any], Any], data: bytes) -> tuple[Any, Job]:
    """The body's JSON and its job: in a worker thread, as parsing, decoding (or fetching) images and tokenising
    would hold up every other connection on the event loop."""
    try:
        body = json.loads(data or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not JSON ({e})") from None
    return body, make(body)


def _error(service: Service, e: RequestError) -> JSONResponse:
    service.metrics.requests.labels(str(e.status)).inc()
    # a 413 left the body unread and a 408 never got all of it: the connection cannot carry another request
    headers = {"Connection": "close"} if e.status in (408, 413) else None
    payload = {
        "message": str(e),
        "type": "invalid_request_error" if e.status < 500 else "server_error",
        "param": e.param,
        "code": e.code,
    }
    return JSONResponse({"error": payload}, status_code=e.status, headers=headers)


class _EventStream:
    """A streamed answer, as an ASGI response: server-sent events in OpenAI's chunk format, ``data: [DONE]`` last."""

    def __init__(self, service: Service, rid: str, job: Job):
        self.service, self.rid, self.job = service, rid, job

    async def __call__(self, scope, receive, send) -> None:
        service, rid, job = self.service, self.rid, self.job

        async def event(data: str) -> None:
            await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})

        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        service.metrics.requests.labels("200").inc()
        try:
            if job.chat:
                await event(json.dumps(service.chunk(rid, job, None)))
            finish, _ = await _answer(job, receive, lambda piece: event(json.dumps(service.chunk(rid, job, piece))))
            await event(json.dumps(service.chunk(rid, job, None, finish)))
        except RequestError as e:
            await event(json.dumps({"error": {"message": str(e), "type": "server_error", "code": e.code}}))
        except ClientGone:
            return  # nobody is left to end the response for
        await event("[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def app(service: Service) -> Starlette:
    """The ASGI application answering for ``service``: its routes, and every error in OpenAI's format."""

    async def complete(request: Request, make: Callable[[Any], Job]) -> Response:
        service.authorise(request.headers.get("authorization"))
        data = await read_body(request, service.max_body_bytes, service.timeout)
        body, job = await run_in_threadpool(parse, make, data)
        job.out = _Outbox(asyncio.get_running_loop())
        service.submit(job)
        rid = f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex}"
        if body.get("stream"):
            return _EventStream(service, rid, job)
        pieces = []

        async def keep(piece: str) -> None:
            pieces.append(piece)

        finish, used = await _answer(job, request.receive, keep)
        service.metrics.requests.labels("200").inc()
        return JSONResponse(service.completion(rid, job, "".join(pieces), finish, used))

    async def chat(request: Request) -> Response:
        return await complete(request, service.job)

    async def text(request: Request) -> Response:
        return await complete(request, service.text_job)

    async def models(request: Request) -> Response:
        service.authorise(request.headers.get("authorization"))
        model = {"id": service.name, "object": "model", "created": 0, "owned_by": "mgjax"}
        return JSONResponse({"object": "list", "data": [model]})

    async def health(request: Request) -> Response:  # open, for load balancers: the process serves
        return JSONResponse({"status": "ok", "model": service.name})

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.text(), media_type=prometheus_client.CONTENT_TYPE_LATEST)

    async def refused(request: Request, e: RequestError) -> Response:
        return _error(service, e)

    async def no_route(request: Request, e: HTTPException) -> Response:  # Starlette's 404 and 405
        code = "not_found" if e.status_code == 404 else "method_not_allowed"
        return _error(service, RequestError(e.status_code, f"no route {request.method} {request.url.path}", code=code))

    async def gone(request: Request, e: ClientGone) -> Response:  # nobody reads it: the status is for the record
        return Response(status_code=499)

    async def failed(request: Request, e: Exception) -> Response:  # logged by uvicorn with its traceback
        return _error(service, RequestError(500, f"internal error ({type(e).__name__})", code="server_error"))

    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", text, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    handlers = {RequestError: refused, HTTPException: no_route, ClientGone: gone, Exception: failed}
    return Starlette(routes=routes, exception_handlers=handlers)


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with the rest of what ``--timeout`` promises. uvicorn closes a connection idle for
    ``timeout_keep_alive`` seconds only after an answer, and restarts that clock at any byte; here it also runs
    from the connection's start, and only a request's complete headers stop it, so a client that sends nothing, or
    trickles its headers in, is closed like an idle one. A client that stops reading an answer is dropped after as
    long (uvicorn would wait for it forever, its request's coroutine with it)."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        # uvicorn's own, but for its stopping the clock here: handle_events stops it when a request's headers are in
        self.conn.receive_data(data)
        self.handle_events()

    def pause_writing(self) -> None:
        super().pause_writing()
        self.stalled = self.loop.call_later(self.timeout_keep_alive, self.transport.abort)

    def resume_writing(self) -> None:
        super().resume_writing()
        self.stalled.cancel()


BACKLOG = 2048  # the listen backlog (Linux caps it at net.core.somaxconn): the standard library's 5 reset clients


class Server:
    """``service`` served by uvicorn on a socket bound at once, so ``port`` is known (port 0 picks a free one) and
    a taken port fails here rather than in a thread: ``run()`` serves in this thread until interrupted (the command
    line), ``start()`` in a background thread until ``stop()`` (tests, benchmarks)."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 8000, application=None):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=BACKLOG)
        self.port = self.socket.getsockname()[1]
        self.url = f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{self.port}"
        config = uvicorn.Config(
            application or app(service),
            http=_Protocol,
            ws="none",
            lifespan="off",
            loop="asyncio",
            interface="asgi3",
            log_config=None,  # the embedding program's logging stays as it is
            access_log=False,  # a line per request is the caller's business
            proxy_headers=False,
            backlog=BACKLOG,
            timeout_keep_alive=service.timeout,
            timeout_graceful_shutdown=service.timeout,  # then requests still answering are cancelled
        )
        self.uvicorn = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    def run(self) -> None:
        self.uvicorn.run(sockets=[self.socket])

    def start(self) -> Server:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        while not self.uvicorn.started:  # connections queue in the backlog meanwhile; a failed start must not hang
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start (uvicorn's log says why)")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join()


def server(service: Service, host: str = "127.0.0.1", port: int = 8000, application=None) -> Server:
    """The server for ``service`` (bound, not yet serving: ``start()`` or ``run()``); port 0 picks a free one.
    ``application``: an app built on ``app(service)`` (the web demo's) in its place."""
    return Server(service, host, port, application)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m mgjax.serve", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    ap.add_argument("--model", required=True, help="a converted checkpoint directory (with tokenizer files)")
    ap.add_argument("--name", help="the model name clients ask for (default: the directory's name)")
    ap.add_argument("--host", default="127.0.0.1", help="the address to listen on; 0.0.0.0: every interface")
    ap.add_argument("--port", type=integer(0, 65535), default=8000, help="the TCP port to listen on; 0: any free one")
    ap.add_argument("--template", help=TEMPLATE_HELP)
    ap.add_argument(
        "--max-batch",
        type=integer(1),
        default=MAX_BATCH,
        help="the most requests decoded together (the engine's slots); more wait for a slot to free",
    )
    ap.add_argument(
        "--max-prompt-tokens",
        type=integer(1),
        default=MAX_PROMPT_TOKENS,
        help="the longest prompt accepted, in tokens; a longer one gets a 400",
    )
    ap.add_argument(
        "--max-tokens", type=integer(1), default=512, help="the answer budget, in tokens, of a request that sets none"
    )
    ap.add_argument(
        "--max-tokens-limit",
        type=integer(1),
        default=MAX_TOKENS_LIMIT,
        help="the largest max_tokens a request may ask for; a larger one gets a 400",
    )
    ap.add_argument(
        "--max-body-bytes",
        type=integer(1),
        default=32 << 20,
        help="the largest request body accepted, in bytes (images included); a larger one gets a 413 unread. Also "
        "the largest image an image URL may download",
    )
    ap.add_argument(
        "--timeout",
        type=number(0.1),
        default=60.0,
        help="seconds a connection may sit idle (or send its headers in part), take to send its body, or stall "
        "reading an answer before it is closed (the request's decoding then stops); also the longest an image URL "
        "may take to download",
    )
    ap.add_argument(
        "--allow-image-urls",
        action="store_true",
        help="download http(s) image_url images, from public addresses only (never loopback, private, link-local, "
        "multicast, reserved or unspecified ones; each redirect checked again); without it only data: URIs are "
        "accepted. Other schemes (file:, ...) are always refused",
    )
    ap.add_argument(
        "--allow-private-image-urls",
        action="store_true",
        help="with --allow-image-urls, download from any address, this machine's and its network's included: for "
        "tests and trusted networks only (a client could reach whatever the server can)",
    )
    ap.add_argument(
        "--api-key",
        help="the key clients must send (Authorization: Bearer KEY) for /v1/*; a request without it gets a 401. "
        "Unset: $MGJAX_API_KEY, or no key (/health and /metrics are always open)",
    )
    add_model_arguments(ap)
    return ap


def listen(service: Service, host: str, port: int, application=None) -> Server:
    """``server``, its socket errors (a port taken, an address not this machine's) named by the flags that chose it."""
    try:
        return server(service, host, port, application)
    except OSError as e:
        raise ValueError(f"--host {host} --port {port}: {e.strerror or e}") from None


def service_from_args(args: argparse.Namespace, model=None, tokenizer=None) -> Service:
    """The service ``parser()``'s flags describe (the model loaded by them unless given)."""
    from pathlib import Path  # noqa: PLC0415

    if model is None:
        model, tokenizer = load_model(args)
    return Service(
        model,
        tokenizer,
        args.name or Path(args.model).resolve().name,
        template=args.template,
        max_batch=args.max_batch,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens,
        max_tokens_limit=args.max_tokens_limit,
        max_body_bytes=args.max_body_bytes,
        timeout=args.timeout,
        exif_transpose=args.exif_transpose,
        api_key=args.api_key or os.environ.get("MGJAX_API_KEY") or None,
        allow_image_urls=args.allow_image_urls,
        allow_private_image_urls=args.allow_private_image_urls,
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    compilation_cache()
    try:
        service = service_from_args(args)
        httpd = listen(service, args.host, args.port)
    except (ValueError, OSError) as e:  # a bad --model, --template, --host or --port: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"serving {service.name} on {httpd.url}/v1", flush=True)
    try:
        httpd.run()  # SIGINT and SIGTERM: uvicorn stops taking connections and lets answers in progress end
    except KeyboardInterrupt:  # uvicorn raises the SIGINT again once it has stopped
        pass
    return 0
