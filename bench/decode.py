"""Decode throughput: mgjax's compiled prefill + step (``mgjax.inference.decoding``) against transformers'
``generate`` on the same random Llama weights and the same hardware, greedy, side by side.

    python bench/decode.py [--layers 8] [--hidden 512] [--vocab 32000] [--batch 1 8] [--prompt 64] [--new 128]
        [--dtype float32] [--repeats 3]

Prints, per batch size, new tokens per second of each (mgjax with its layers' weights per layer, as its CLIs
decode, and stacked, as it trains) and the ratios mgjax / transformers, and whether all produced the same
tokens. transformers runs on torch's device (CUDA when torch sees a GPU, else the CPU); mgjax on JAX's default
device. Compilation is excluded (one warm-up run each).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from timing import median_seconds  # bench/timing.py: the script's folder is on sys.path

import mgjax
from mgjax.inference import decoding
from mgjax.nn import layers


def _torch_seconds(hf, ids: torch.Tensor, new: int, repeats: int) -> tuple[float, np.ndarray]:
    def run():
        return hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )

    with torch.no_grad():
        out = run()
        times = []
        for _ in range(repeats):
            if ids.is_cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = run()
            if ids.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return float(np.median(times)), out.cpu().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).to(torch_dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model = mgjax.from_pretrained(tmp, dtype=jnp.dtype(args.dtype))
    hf = hf.to(device)
    n = sum(p.numel() for p in hf.parameters())
    print(
        f"Llama {n / 1e6:.1f}M parameters ({args.layers} layers, hidden {args.hidden}, vocab {args.vocab}), "
        f"{args.dtype}, prompt {args.prompt}, {args.new} new tokens, greedy"
    )
    print(f"mgjax on {jax.devices()[0].device_kind}, transformers {transformers.__version__} on {device}")
    print("mgjax per-layer: the layers' weights as separate arrays, as the CLIs load them (layers.unstack);")
    print("mgjax stacked: one array per weight with a leading layer axis, as training holds them")
    print(
        f"{'batch':>5s} {'per-layer tok/s':>16s} {'stacked tok/s':>14s} {'hf tok/s':>9s} "
        f"{'per-layer/hf':>12s} {'stacked/hf':>10s}  same tokens"
    )
    for b in args.batch:
        ids = jnp.asarray(np.random.default_rng(b).integers(1, args.vocab, (b, args.prompt)).astype(np.int32))
        seconds, ours = {}, {}
        for layout, convert in (("stacked", layers.restack), ("per-layer", layers.unstack)):
            convert(model)
            seconds[layout] = median_seconds(lambda x: decoding.generate(model, x, args.new), ids, repeats=args.repeats)
            ours[layout] = np.asarray(decoding.generate(model, ids, args.new))
        theirs_s, theirs = _torch_seconds(
            hf, torch.tensor(np.asarray(ids), dtype=torch.long, device=device), args.new, args.repeats
        )
        tokens = b * args.new
        same = min(np.mean(o[:, args.prompt :] == theirs[:, args.prompt :]) for o in ours.values())
        per, stacked = seconds["per-layer"], seconds["stacked"]
        print(
            f"{b:5d} {tokens / per:16.1f} {tokens / stacked:14.1f} {tokens / theirs_s:9.1f} "
            f"{theirs_s / per:12.2f} {theirs_s / stacked:10.2f}  {same:.0%}"
        )


if __name__ == "__main__":
    main()
