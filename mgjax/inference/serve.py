"""``python -m mgjax.serve --model DIR``: an OpenAI-compatible chat endpoint (``POST /v1/chat/completions``, ``GET
/v1/models``) for any converted model, with images as ``image_url`` data URIs, streaming (server-sent events) and
concurrent requests decoded together.

Requests wait up to ``--batch-wait`` seconds for company; those with the same sampling settings (and, for MGM,
all with or all without an image) are left-padded into one batch of at most ``--max-batch`` rows and decoded in
one pass, each cut at its own ``max_tokens``, stop tokens and ``stop`` strings. A bad request (unknown model,
malformed messages, an image that does not decode or is not a data URI, a prompt over ``--max-prompt-tokens``)
gets a 4xx error in OpenAI's format and the server goes on. A system message is put before the first user
message's text: the templates fix their own system prompt. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

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
    finished: str | None = None


def _image(url: str, where: str, exif_transpose: bool) -> Image.Image:
    if not url.startswith("data:"):
        raise RequestError(400, f"{where}: only data: URIs are accepted (the server downloads nothing)", param=where)
    head, _, payload = url.partition(",")
    try:
        data = base64.b64decode(payload, validate=True) if head.endswith(";base64") else payload.encode()
        img = Image.open(io.BytesIO(data))
        img.load()
        return preprocess.rgb(img, exif_transpose=exif_transpose, where=where)
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise RequestError(400, f"{where}: the image does not decode ({e})", param=where) from None


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


class Batcher:
    """The decoding thread: collects jobs, decodes compatible ones together, streams their text out."""

    def __init__(self, model, tokenizer, template: str | None, *, max_batch: int, wait: float):
        self.model, self.tokenizer, self.template = model, tokenizer, template
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
                job.out.put(RequestError(500, f"decoding failed: {e}", code="server_error"))
            return
        for job in batch:
            job.out.put((job.finished or "length", len(job.tokens)))

    def _steps(self, batch: list[Job]):
        ids, mask = decoding.left_pad([j.ids for j in batch], self.tokenizer.pad_token_id or 0, bucket=BUCKET)
        ids, mask = jnp.asarray(ids), jnp.asarray(mask)
        embeds = batch_embeds(self.model, ids, [j.image_args for j in batch])
        lm = getattr(self.model, "language_model", self.model)
        return decoding.stream(
            lm,
            ids,
            max(j.max_tokens for j in batch),
            attention_mask=mask,
            inputs_embeds=embeds,
            sampling=batch[0].sampling,
            stop_ids=self.stop_ids,
        )

    def _advance(self, job: Job, token: int) -> None:
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
        exif_transpose: bool = False,
    ):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.exif_transpose = exif_transpose
        self.template = template or default_template(model, tokenizer)
        self.max_prompt_tokens, self.default_max_tokens = max_prompt_tokens, max_tokens
        self.batcher = Batcher(model, tokenizer, self.template, max_batch=max_batch, wait=wait)

    def job(self, body: Any) -> Job:
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        if body.get("model") != self.name:
            raise RequestError(
                404,
                f"model {body.get('model')!r} does not exist; this server has {self.name!r}",
                code="model_not_found",
                param="model",
            )
        turns, images = conversation(body.get("messages"), self.exif_transpose)
        try:
            ids, image_args = conversation_inputs(self.model, self.tokenizer, self.template, turns, images)
            sampling = decoding.Sampling(
                temperature=float(body.get("temperature") or 0.0),
                top_p=float(body.get("top_p") or 1.0),
                seed=int(body.get("seed") or 0),
            )
        except (ValueError, TypeError) as e:
            raise RequestError(400, str(e)) from None
        if ids.shape[1] > self.max_prompt_tokens:
            raise RequestError(
                400,
                f"the prompt has {ids.shape[1]} tokens, more than this server's {self.max_prompt_tokens}",
                code="context_length_exceeded",
                param="messages",
            )
        budget = body.get("max_completion_tokens") or body.get("max_tokens") or self.default_max_tokens
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else stops
        if not isinstance(budget, int) or budget < 1 or not all(isinstance(s, str) for s in stops):
            raise RequestError(400, "max_tokens must be a positive integer and stop a string or list of strings")
        return Job(ids[0], image_args, sampling, budget, stops)

    def submit(self, job: Job) -> Job:
        self.batcher.jobs.put(job)
        return job

    def chunk(self, rid: str, delta: dict, finish: str | None = None) -> dict:
        return {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def completion(self, rid: str, job: Job, text: str, finish: str, used: int) -> dict:
        return {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": len(job.ids), "completion_tokens": used, "total_tokens": len(job.ids) + used},
        }


def _pieces(job: Job):
    """The job's text pieces, then its (finish reason, completion tokens)."""
    while True:
        item = job.out.get()
        if isinstance(item, RequestError):
            raise item
        yield item
        if isinstance(item, tuple):
            return


def handler(service: Service):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: one line per request is the caller's business
            pass

        def _json(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, e: RequestError) -> None:
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

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
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
                if self.path.rstrip("/") != "/v1/chat/completions":
                    raise RequestError(404, f"no route {self.path}", code="not_found")
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"null")
                except json.JSONDecodeError as e:
                    raise RequestError(400, f"the body is not JSON ({e})") from None
                job = service.submit(service.job(body))
                rid = f"chatcmpl-{uuid.uuid4().hex}"
                if body.get("stream"):
                    self._stream(rid, job)
                    return
                pieces = list(_pieces(job))
                finish, used = pieces[-1]
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
            send(json.dumps(service.chunk(rid, {"role": "assistant", "content": ""})))
            try:
                for piece in _pieces(job):
                    if isinstance(piece, tuple):
                        send(json.dumps(service.chunk(rid, {}, piece[0])))
                    else:
                        send(json.dumps(service.chunk(rid, {"content": piece})))
            except RequestError as e:
                send(json.dumps({"error": {"message": str(e), "type": "server_error", "code": e.code}}))
            send("[DONE]")
            self.wfile.flush()
            self.close_connection = True

    return Handler


def server(service: Service, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """The HTTP server (not yet serving: call ``serve_forever``); port 0 picks a free one."""
    httpd = ThreadingHTTPServer((host, port), handler(service))
    httpd.daemon_threads = True
    return httpd


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
            exif_transpose=args.exif_transpose,
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
