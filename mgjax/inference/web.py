"""``python -m mgjax.web --model DIR``: a chat page in the browser on top of ``mgjax.serve``'s OpenAI-compatible
server: the same API under ``/v1``, and at ``/`` one self-contained page (``web.html``: inline CSS and JS, nothing
loaded from elsewhere) to upload an image, chat about it over several turns with the answer streamed in, stop an
answer, start over, and set the temperature and the answer's length.

With ``--sd-model DIR`` (a local diffusers pipeline; the ``gen`` extra) and an MGM model, the page can ask for an
image (MGM's ``<GEN>``) and draws the prompt an answer writes inside ``<h>…</h>`` through ``POST
/v1/images/generations`` (OpenAI's shape: ``{"prompt": ..., "response_format": "b64_json"}`` ->
``{"data": [{"b64_json": ...}]}``), run in a worker thread, one image at a time; without ``--sd-model`` that route
does not exist (404). Every server flag works as in ``mgjax.serve``; with ``--api-key`` the page asks for the key.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import threading
import time
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from mgjax.cli import compilation_cache, integer
from mgjax.inference import imagegen, serve
from mgjax.inference.generate import load_model
from mgjax.inference.serve import RequestError, Service

PAGE = "web.html"
CONFIG = "__MGJAX_CONFIG__"  # where the page's settings go, as JSON
MAX_PROMPT_CHARS = 4000  # an image prompt's longest (OpenAI's limit for its own models)
# the page loads nothing from elsewhere and may not be framed; its one script and style are inline
SECURITY = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def page(service: Service, images: bool) -> str:
    """The page, with what it needs to know of this server: the model's name, the answer budget and its limit,
    whether a key is asked for and whether images are drawn."""
    settings = {
        "model": service.name,
        "max_tokens": service.default_max_tokens,
        "max_tokens_limit": service.max_tokens_limit,
        "api_key": service.api_key is not None,
        "images": images,
    }
    # inside <script>: no "</script>" or "<!--" can come from a name
    text = json.dumps(settings).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return resources.files(__package__).joinpath(PAGE).read_text(encoding="utf-8").replace(CONFIG, text)


def image_request(body: Any) -> str:
    """An image generation request's prompt, its fields checked as ``/v1/chat/completions`` checks its own: what
    asks for something this server does not do is a 400 naming the field."""
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(400, "prompt must be a non-empty string", param="prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(400, f"prompt has {len(prompt)} characters, over {MAX_PROMPT_CHARS}", param="prompt")
    if body.get("n") not in (None, 1):
        raise RequestError(400, "n: only one image per request is supported", param="n")
    if body.get("response_format") not in (None, "b64_json"):
        raise RequestError(
            400, "response_format: only b64_json is supported (this server keeps no files)", param="response_format"
        )
    return prompt.strip()


class Drawer:
    """A ``TextToImage`` called from worker threads one prompt at a time (a diffusers pipeline keeps its
    scheduler's state between calls, and one image already takes every core), as a base64 PNG."""

    def __init__(self, draw: imagegen.TextToImage):
        self.draw, self.lock = draw, threading.Lock()

    def __call__(self, prompt: str) -> str:
        with self.lock:
            try:
                image = self.draw(prompt)
            except Exception as e:  # noqa: BLE001  (the pipeline's own: out of memory, a bad scheduler ...)
                raise RequestError(500, f"drawing failed: {type(e).__name__}: {e}", code="server_error") from None
        out = io.BytesIO()
        image.save(out, format="PNG")
        return base64.b64encode(out.getvalue()).decode()


def app(service: Service, draw: imagegen.TextToImage | None = None) -> Starlette:
    """``mgjax.serve``'s application for ``service`` with the page at ``/`` and, when ``draw`` is given,
    ``POST /v1/images/generations``; errors in OpenAI's format, as every other route's."""
    api = serve.app(service)
    html = page(service, draw is not None)

    async def index(request: Request) -> Response:
        return HTMLResponse(html, headers=SECURITY)

    routes = [Route("/", index, methods=["GET"])]
    if draw is not None:
        drawer = Drawer(draw)

        async def generations(request: Request) -> Response:
            service.authorise(request.headers.get("authorization"))
            data = await serve.read_body(request, service.max_body_bytes, service.timeout)
            if not request.headers.get("content-type", "").startswith("application/json"):
                # a JSON body needs CORS' preflight, so another site's page cannot have a visitor's browser draw
                raise RequestError(
                    415, "the body must be JSON (Content-Type: application/json)", code="bad_content_type"
                )
            _, prompt = await run_in_threadpool(serve.parse, image_request, data)
            picture = await run_in_threadpool(drawer, prompt)  # seconds to minutes: off the event loop
            return JSONResponse(
                {"created": int(time.time()), "data": [{"b64_json": picture, "revised_prompt": prompt}]}
            )

        routes.append(Route("/v1/images/generations", generations, methods=["POST"]))
    api.router.routes[:0] = routes  # before the API's: its own 404 stays the answer for every other path
    return api


def server(
    service: Service, host: str = "127.0.0.1", port: int = 8000, draw: imagegen.TextToImage | None = None
) -> serve.Server:
    """``serve.server`` (the same transport, limits and timeouts) answering with this module's ``app``."""
    return serve.server(service, host, port, app(service, draw))


def parser() -> argparse.ArgumentParser:
    """``mgjax.serve``'s flags, every one, and the image generation's."""
    ap = serve.parser()
    ap.prog, ap.description = "python -m mgjax.web", __doc__.split("\n\n")[0]
    ap.add_argument(
        "--sd-model",
        help='a local diffusers pipeline directory (pip install -e ".[gen]") that draws the <h>...</h> prompts of '
        "an MGM model's answers; the page then offers MGM's <GEN>. Unset: nothing is drawn, and "
        "/v1/images/generations does not exist",
    )
    ap.add_argument("--sd-steps", type=integer(1), default=50, help="denoising steps per drawn image")
    return ap


def _service(args: argparse.Namespace) -> tuple[Service, imagegen.TextToImage | None]:
    """The service ``mgjax.serve`` would build from the same flags, and the drawer of ``--sd-model``."""
    model, tokenizer = load_model(args)
    draw = None
    if args.sd_model:
        kind = getattr(getattr(model, "config", None), "model_type", None)
        if kind != "mgm":
            raise ValueError(f"--sd-model: only MGM models write image prompts; --model {args.model} is {kind}")
        draw = imagegen.DiffusersBackend(args.sd_model, steps=args.sd_steps)
    return serve.service_from_args(args, model, tokenizer), draw


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    compilation_cache()
    try:
        service, draw = _service(args)
        httpd = serve.listen(service, args.host, args.port, app(service, draw))
    except (ValueError, OSError, ImportError) as e:  # a bad --model, --template, --sd-model, --host or --port
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"serving {service.name} on {httpd.url}/ (the page) and {httpd.url}/v1 (the API)", flush=True)
    try:
        httpd.run()  # SIGINT and SIGTERM: uvicorn stops taking connections and lets answers in progress end
    except KeyboardInterrupt:
        pass
    return 0
