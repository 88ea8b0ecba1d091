"""``python -m mgjax.serve --model DIR``: an OpenAI-compatible server (``POST /v1/chat/completions``, ``POST
/v1/completions`` for raw text prompts, ``GET /v1/models``, ``/health``, ``/metrics``) for any converted model,
with images as ``image_url`` data URIs, streaming (server-sent events) and concurrent requests decoded together.

Requests wait up to ``--batch-wait`` seconds for company; those with the same sampling settings (and, for MGM,
all with or all without an image) are left-padded into one batch of at most ``--max-batch`` rows and decoded in
one pass, each cut at its own ``max_tokens``, stop tokens and ``stop`` strings. A bad request (unknown model,
malformed messages, an image that does not decode or is not a data URI, a prompt over ``--max-prompt-tokens``)
gets a 4xx error in OpenAI's format and the server goes on; so does one whose settings are out of range
(``temperature`` NaN or over 2, ``top_p`` 0, ``max_tokens`` 0 or over ``--max-tokens-limit``, a 2^70 seed, a
``stop`` that is not strings) or unsupported (``n`` > 1, ``tools``), a body over ``--max-body-bytes`` (413, left
unread) and a prompt far over the limit (refused before tokenising). A client that leaves mid-stream stops its
decoding; connections idle past ``--timeout`` are closed. A system message is put before the first user
message's text: the templates fix their own system prompt. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import base64
import hmac
import io
import json
import math
import os
import queue
import select
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jax.numpy as jnp
import numpy as np
import prometheus_client
from PIL import Image

from mgjax.cli import HelpFormatter, compilation_cache, integer, number
from mgjax.data import preprocess, templates
from mgjax.inference import decoding
from mgjax.inference.generate import (
    TEMPLATE_HELP,
    add_model_arguments,
    batch_embeds,
    conversation_inputs,
    default_template,
    load_model,
    stop_ids,
)

BUCKET = 64  # prompts padded to a multiple of this: a handful of compiled shapes serve every request


class RequestError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


@dataclass(eq=False)  # a job is itself: batching picks jobs out by identity
class Job:
    """One request: its prompt, how to decode it, and the queue its text goes out through (pieces, then a
    ``(finish_reason, completion_tokens)`` tuple)."""

    ids: np.ndarray
    image_args: dict
    sampling: decoding.Sampling
    max_tokens: int
    stops: list[str]
    out: queue.Queue = field(default_factory=queue.Queue)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finished: str | None = None  # stop, length, or cancelled (the client left)
    chat: bool = True  # a chat completion; False: a text completion (/v1/completions)
    submitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None  # when its first token was decoded

    def cancel(self) -> None:
        """The client is gone: the batch stops decoding for this job (and ends once every job in it has)."""
        self.finished = self.finished or "cancelled"


def _image(url: str, where: str, exif_transpose: bool) -> Image.Image:
    if not url.startswith("data:"):
        raise RequestError(400, f"{where}: only data: URIs are accepted (the server downloads nothing)", param=where)
    head, _, payload = url.partition(",")
    try:
        data = base64.b64decode(payload, validate=True) if head.endswith(";base64") else payload.encode()
        img = Image.open(io.BytesIO(data))
        img.load()
        return preprocess.rgb(img, exif_transpose=exif_transpose, where=where)
    except Image.DecompressionBombError as e:
        raise RequestError(400, f"{where}: the image is too large to decode ({e})", param=where) from None
    except Exception as e:  # noqa: BLE001  (PIL raises many types on damaged files: struct.error, EOFError, ...)
        raise RequestError(400, f"{where}: the image does not decode ({type(e).__name__}: {e})", param=where) from None


def conversation(messages: Any, exif_transpose: bool = False) -> tuple[list[dict], list]:
    """OpenAI messages -> (template turns, images in order). Text parts keep their order; each image part becomes
    an ``<image>`` placeholder where it stands."""
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


class Batcher:
    """The decoding thread: collects jobs, decodes compatible ones together, streams their text out."""

    def __init__(self, model, tokenizer, template: str | None, *, max_batch: int, wait: float, metrics: Metrics):
        self.model, self.tokenizer, self.template, self.metrics = model, tokenizer, template, metrics
        self.max_batch, self.wait = max_batch, wait
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.stop_ids = stop_ids(tokenizer, template)
        self.batch_sizes: list[int] = []  # what ran together (for tests and logs)
        self.lock = threading.Lock()  # one decode at a time
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        held: list[Job] = []
        while True:
            if not held:
                held.append(self.jobs.get())
            deadline = time.monotonic() + self.wait
            while time.monotonic() < deadline:
                try:
                    held.append(self.jobs.get(timeout=max(deadline - time.monotonic(), 0)))
                except queue.Empty:
                    break
            key = self._key(held[0])
            batch = [j for j in held if self._key(j) == key][: self.max_batch]
            held = [j for j in held if j not in batch]
            self._decode(batch)

    def _key(self, job: Job):
        mgm = hasattr(self.model.config, "vision_aux")
        return job.sampling, mgm and bool(job.image_args)

    def _decode(self, batch: list[Job]) -> None:
        self.batch_sizes.append(len(batch))
        try:
            with self.lock:
                for step in self._steps(batch):
                    for job, token in zip(batch, step):
                        if job.finished is None:
                            self._advance(job, int(token))
                    if all(j.finished for j in batch):
                        break
        except Exception as e:  # noqa: BLE001  (a failed decode must not leave clients waiting forever)
            for job in batch:
                self.metrics.queue.dec()
                job.out.put(RequestError(500, f"decoding failed: {e}", code="server_error"))
            return
        for job in batch:
            self.metrics.latency.observe(time.monotonic() - job.submitted)
            self.metrics.queue.dec()
            job.out.put((job.finished or "length", len(job.tokens)))

    def _steps(self, batch: list[Job]):
        # rows padded to a power of two with copies of the first job (their tokens unread): 1, 2, 4, 8 rows compile,
        # not every count up to --max-batch
        rows = batch + [batch[0]] * (
            max(len(batch), min(1 << (len(batch) - 1).bit_length(), self.max_batch)) - len(batch)
        )
        ids, mask = decoding.left_pad([j.ids for j in rows], self.tokenizer.pad_token_id or 0, bucket=BUCKET)
        ids, mask = jnp.asarray(ids), jnp.asarray(mask)
        embeds = batch_embeds(self.model, ids, [j.image_args for j in rows])
        lm = getattr(self.model, "language_model", self.model)
        budget = max(j.max_tokens for j in batch)
        return decoding.stream(
            lm,
            ids,
            -(-budget // BUCKET) * BUCKET,  # a few compiled shapes serve every budget; each job stops at its own
            attention_mask=mask,
            inputs_embeds=embeds,
            sampling=batch[0].sampling,
            stop_ids=self.stop_ids,
        )

    def _advance(self, job: Job, token: int) -> None:
        if job.first_token is None:
            job.first_token = time.monotonic()
            self.metrics.first_token.observe(job.first_token - job.submitted)
        self.metrics.tokens.inc()
        if token in self.stop_ids:
            job.finished = "stop"
            return
        job.tokens.append(token)
        text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        cut = min((text.find(s) for s in job.stops if s in text), default=-1)
        if cut >= 0:
            text, job.finished = text[:cut], "stop"
        if text.startswith(job.text) and len(text) > len(job.text):  # bytes of a character may come later
            job.out.put(text[len(job.text) :])
            job.text = text
        if job.finished is None and len(job.tokens) >= job.max_tokens:
            job.finished = "length"


class Service:
    """Requests -> jobs: validation, prompts, and the OpenAI response shapes."""

    def __init__(
        self,
        model,
        tokenizer,
        name: str,
        *,
        template: str | None = None,
        max_batch: int = 8,
        wait: float = 0.05,
        max_prompt_tokens: int = 4096,
        max_tokens: int = 512,
        max_tokens_limit: int = 4096,
        max_body_bytes: int = 32 << 20,
        timeout: float = 60.0,
        exif_transpose: bool = False,
        api_key: str | None = None,
    ):
        if max_tokens > max_tokens_limit:
            raise ValueError(f"--max-tokens {max_tokens} is over --max-tokens-limit {max_tokens_limit}")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.exif_transpose = exif_transpose
        self.template = template or default_template(model, tokenizer)
        self.max_prompt_tokens, self.default_max_tokens = max_prompt_tokens, max_tokens
        self.max_tokens_limit, self.max_body_bytes, self.timeout = max_tokens_limit, max_body_bytes, timeout
        self.api_key = api_key
        self.metrics = Metrics()
        self.batcher = Batcher(model, tokenizer, self.template, max_batch=max_batch, wait=wait, metrics=self.metrics)

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
        turns, images = conversation(body.get("messages"), self.exif_transpose)
        try:
            ids, image_args = conversation_inputs(self.model, self.tokenizer, self.template, turns, images)
        except (ValueError, TypeError) as e:
            raise RequestError(400, str(e)) from None
        self._check_prompt_tokens(ids.shape[1], "messages")
        return Job(ids[0], image_args, sampling, budget, stops)

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
        self.batcher.jobs.put(job)
        return job

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
    """The client closed its connection while its answer was being decoded."""


def _pieces(job: Job, gone):
    """The job's text pieces, then its (finish reason, completion tokens). While it waits it checks ``gone()``
    twice a second: a client that left cancels the job (``ClientGone``), even when nothing was written to it."""
    while True:
        try:
            item = job.out.get(timeout=0.5)
        except queue.Empty:
            if gone():
                job.cancel()
                raise ClientGone from None
            continue
        if isinstance(item, RequestError):
            raise item
        yield item
        if isinstance(item, tuple):
            return


def handler(service: Service):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = service.timeout  # a connection idle (or a body or reader this slow) that long is closed

        def log_message(self, *args):  # quiet: one line per request is the caller's business
            pass

        def _send(self, status: int, data: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _json(self, status: int, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _error(self, e: RequestError) -> None:
            service.metrics.requests.labels(str(e.status)).inc()
            self._json(
                e.status,
                {
                    "error": {
                        "message": str(e),
                        "type": "invalid_request_error" if e.status < 500 else "server_error",
                        "param": e.param,
                        "code": e.code,
                    }
                },
            )

        def _body(self) -> Any:
            """The request's JSON body, read only when its declared length is within the limit; a body that
            arrives slower than the timeout ends the connection (the socket's own timeout)."""
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                raise RequestError(411, "a Content-Length header is required", code="length_required") from None
            if length < 0 or length > service.max_body_bytes:
                self.close_connection = True  # the body stays unread
                raise RequestError(
                    413, f"the body has {length} bytes, over this server's {service.max_body_bytes}", code="too_large"
                )
            data = self.rfile.read(length)
            if len(data) < length:
                self.close_connection = True
                raise RequestError(400, f"the body ended after {len(data)} of its {length} bytes")
            try:
                return json.loads(data or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(400, f"the body is not JSON ({e})") from None

        def _gone(self) -> bool:
            """Whether the client has closed its end (readable, with nothing to read)."""
            try:
                readable, _, _ = select.select([self.connection], [], [], 0)
                return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True

        def do_GET(self):
            path = self.path.rstrip("/")
            if path == "/health":  # open, for load balancers: the process serves and its decoder thread lives
                self._json(200, {"status": "ok", "model": service.name})
                return
            if path == "/metrics":
                self._send(200, service.metrics.text(), prometheus_client.CONTENT_TYPE_LATEST)
                return
            try:
                service.authorise(self.headers.get("Authorization"))
            except RequestError as e:
                self._error(e)
                return
            if path == "/v1/models":
                self._json(
                    200,
                    {
                        "object": "list",
                        "data": [{"id": service.name, "object": "model", "created": 0, "owned_by": "mgjax"}],
                    },
                )
            else:
                self._error(RequestError(404, f"no route {self.path}", code="not_found"))

        def do_POST(self):
            try:
                make = {"/v1/chat/completions": service.job, "/v1/completions": service.text_job}.get(
                    self.path.rstrip("/")
                )
                if make is None:
                    raise RequestError(404, f"no route {self.path}", code="not_found")
                service.authorise(self.headers.get("Authorization"))
                body = self._body()
                job = service.submit(make(body))
                rid = f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex}"
                if body.get("stream"):
                    self._stream(rid, job)
                    return
                try:
                    pieces = list(_pieces(job, self._gone))
                except ClientGone:
                    self.close_connection = True
                    return
                finish, used = pieces[-1]
                service.metrics.requests.labels("200").inc()
                self._json(200, service.completion(rid, job, "".join(pieces[:-1]), finish, used))
            except RequestError as e:
                self._error(e)

        def _stream(self, rid: str, job: Job) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            send = lambda payload: self.wfile.write(f"data: {payload}\n\n".encode())  # noqa: E731
            self.close_connection = True
            service.metrics.requests.labels("200").inc()
            try:
                if job.chat:
                    send(json.dumps(service.chunk(rid, job, None)))
                try:
                    for piece in _pieces(job, self._gone):
                        if isinstance(piece, tuple):
                            send(json.dumps(service.chunk(rid, job, None, piece[0])))
                        else:
                            send(json.dumps(service.chunk(rid, job, piece)))
                except RequestError as e:
                    send(json.dumps({"error": {"message": str(e), "type": "server_error", "code": e.code}}))
                send("[DONE]")
                self.wfile.flush()
            except (OSError, ClientGone):  # the client left mid-stream (or stopped reading past the timeout)
                job.cancel()

    return Handler


def server(service: Service, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """The HTTP server (not yet serving: call ``serve_forever``); port 0 picks a free one."""
    httpd = Server((host, port), handler(service))
    httpd.daemon_threads = True
    return httpd


class Server(ThreadingHTTPServer):
    request_queue_size = 256  # the listen backlog: the standard library's 5 reset clients that arrived together


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m mgjax.serve", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    ap.add_argument("--model", required=True, help="a converted checkpoint directory (with tokenizer files)")
    ap.add_argument("--name", help="the model name clients ask for (default: the directory's name)")
    ap.add_argument("--host", default="127.0.0.1", help="the address to listen on; 0.0.0.0: every interface")
    ap.add_argument("--port", type=integer(0, 65535), default=8000, help="the TCP port to listen on; 0: any free one")
    ap.add_argument("--template", help=TEMPLATE_HELP)
    ap.add_argument("--max-batch", type=integer(1), default=8, help="the most requests decoded together, in rows")
    ap.add_argument("--batch-wait", type=number(0), default=0.05, help="seconds a request waits for others to join it")
    ap.add_argument(
        "--max-prompt-tokens",
        type=integer(1),
        default=4096,
        help="the longest prompt accepted, in tokens; a longer one gets a 400",
    )
    ap.add_argument(
        "--max-tokens", type=integer(1), default=512, help="the answer budget, in tokens, of a request that sets none"
    )
    ap.add_argument(
        "--max-tokens-limit",
        type=integer(1),
        default=4096,
        help="the largest max_tokens a request may ask for; a larger one gets a 400",
    )
    ap.add_argument(
        "--max-body-bytes",
        type=integer(1),
        default=32 << 20,
        help="the largest request body accepted, in bytes (images included); a larger one gets a 413 unread",
    )
    ap.add_argument(
        "--timeout",
        type=number(0.1),
        default=60.0,
        help="seconds a connection may sit idle, or take to send its body or read a streamed answer, before it is "
        "closed (a streamed request's decoding then stops)",
    )
    ap.add_argument(
        "--api-key",
        help="the key clients must send (Authorization: Bearer KEY) for /v1/*; a request without it gets a 401. "
        "Unset: $MGJAX_API_KEY, or no key (/health and /metrics are always open)",
    )
    add_model_arguments(ap)
    return ap


def _listen(service: Service, host: str, port: int) -> ThreadingHTTPServer:
    """``server``, its socket errors (a port taken, an address not this machine's) named by the flags that chose it."""
    try:
        return server(service, host, port)
    except OSError as e:
        raise ValueError(f"--host {host} --port {port}: {e.strerror or e}") from None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    compilation_cache()

    from pathlib import Path  # noqa: PLC0415

    try:
        model, tokenizer = load_model(args)
        service = Service(
            model,
            tokenizer,
            args.name or Path(args.model).resolve().name,
            template=args.template,
            max_batch=args.max_batch,
            wait=args.batch_wait,
            max_prompt_tokens=args.max_prompt_tokens,
            max_tokens=args.max_tokens,
            max_tokens_limit=args.max_tokens_limit,
            max_body_bytes=args.max_body_bytes,
            timeout=args.timeout,
            exif_transpose=args.exif_transpose,
            api_key=args.api_key or os.environ.get("MGJAX_API_KEY") or None,
        )
        httpd = _listen(service, args.host, args.port)
    except (ValueError, OSError) as e:  # a bad --model, --template, --host or --port: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"serving {service.name} on http://{args.host}:{httpd.server_address[1]}/v1", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0
