"""A bounded load test of ``mgjax.serve`` on 127.0.0.1: requests arrive as a Poisson process, with mixed prompt
lengths, answer budgets and images, each streamed by its own client thread; prints throughput and the p50 / p99
time to first token (the server's: arrival to first decoded token) and request latency (the client's).

    python bench/serve_load.py --model DIR [--image PATH] [--requests 64] [--rate 4] [--max-batch 8]
                               [--image-share 0.5] [--min-tokens 8] [--max-tokens 64] [--seed 0]

Also prints how many requests decoded together at each step (the continuous-batching engine's slots in use).

The server runs in this process (``serve.server(service, port=0).start()``: uvicorn in a background thread, on a
free port); clients speak HTTP to it as any client would.
Compilation is excluded: the same load (same seed, same arrivals) runs twice and the second run is measured. Run it
before and after a change to the serving engine, on the same machine, and compare the lines it prints.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import threading
import time
from pathlib import Path

import numpy as np

from mgjax.inference import serve
from mgjax.inference.generate import load_model

WORDS = "what is this a red cat dog on the table how many are there describe picture color".split()


def _request(port: int, body: dict, record: dict) -> None:
    """One streamed request, read to its end; its status and latency into ``record``."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    record["status"] = response.status
    for _ in response:  # the events as they stream
        pass
    record["latency"] = time.perf_counter() - start
    conn.close()


def _body(rng: np.random.Generator, name: str, image: str | None, args) -> dict:
    text = " ".join(rng.choice(WORDS, size=int(rng.integers(4, 48))))
    content = [{"type": "text", "text": text}]
    if image and rng.random() < args.image_share:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    budget = int(rng.integers(args.min_tokens, args.max_tokens + 1))
    return {"model": name, "messages": [{"role": "user", "content": content}], "max_tokens": budget, "stream": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a converted checkpoint directory with tokenizer files")
    ap.add_argument("--image", help="an image sent with --image-share of the requests (none: text only)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second (Poisson)")
    ap.add_argument("--max-batch", type=int, default=8, help="the engine's slots")
    ap.add_argument("--image-share", type=float, default=0.5)
    ap.add_argument("--min-tokens", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model, tokenizer = load_model(
        argparse.Namespace(model=args.model, dtype=args.dtype, mesh=None, quant=None, towers_root=None, towers="mgm")
    )
    service = serve.Service(model, tokenizer, "bench", max_batch=args.max_batch, max_tokens=args.max_tokens)
    jobs = []  # the server's own record of each request: when it arrived, when its first token was decoded
    submit = service.submit
    service.submit = lambda job: jobs.append(job) or submit(job)
    httpd = serve.server(service, port=0).start()
    port = httpd.port
    image = None
    if args.image:
        image = "data:image/png;base64," + base64.b64encode(Path(args.image).read_bytes()).decode()

    for _ in range(2):  # the same load twice: the first compiles every shape it meets, the second is measured
        rng = np.random.default_rng(args.seed)
        records, threads = [], []
        jobs.clear()
        start = time.perf_counter()
        for _ in range(args.requests):
            time.sleep(rng.exponential(1 / args.rate))
            record: dict = {}
            records.append(record)
            t = threading.Thread(target=_request, args=(port, _body(rng, "bench", image, args), record))
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
        sizes = list(service.engine.occupancy)
        service.engine.occupancy.clear()
    wall = time.perf_counter() - start
    httpd.stop()

    ok = [r for r in records if r.get("status") == 200]
    first = np.array([j.first_token - j.submitted for j in jobs if j.first_token is not None])
    latency = np.array([r["latency"] for r in ok])
    tokens = sum(len(j.tokens) for j in jobs)
    print(
        f"{args.requests} requests at {args.rate:g}/s (Poisson), max batch {args.max_batch}, "
        f"{args.image_share:.0%} with an image, budgets {args.min_tokens}-{args.max_tokens} tokens, {args.dtype}"
    )
    per = tokens / max(len(jobs), 1)
    rates = f"{len(ok) / wall:.2f} requests/s, {tokens / wall:.1f} answer tokens/s ({per:.1f} a request)"
    print(f"answered {len(ok)}/{len(records)} in {wall:.1f} s: {rates}")
    for name, values in (("time to first token", first), ("latency", latency)):
        if len(values):
            print(f"{name}: p50 {np.percentile(values, 50):.3f} s, p99 {np.percentile(values, 99):.3f} s")
    print(f"requests decoding together, per step: mean {np.mean(sizes):.2f}, max {max(sizes)}")


if __name__ == "__main__":
    main()
