"""Weight-only quantization (``mgjax.nn.quant``): what int8 and int4 cost in accuracy and buy in memory and speed,
against the bfloat16 and float32 model, side by side in one run.

    python bench/quant.py [--steps 300] [--layers 4] [--hidden 256] [--new 64] [--repeats 3]

A random model's next-token distributions are nearly flat, which hides quantization error, so the bench first
trains a small byte-level Llama (transformers, on this CPU) on the project's docs for ``--steps`` steps and
measures on held-out text (README.md, which it never trained on): per scheme, the weights' bytes, KL(float32 ||
scheme) per token, the top-1 agreement with float32, the held-out bits per byte, and greedy decode tokens/s at
batch 1 (mgjax's per-layer decoding layout, as the CLIs load models).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from timing import median_seconds  # bench/timing.py: the script's folder is on sys.path

import mgjax
from mgjax.inference import decoding
from mgjax.nn import layers, quant

ROOT = Path(__file__).resolve().parent.parent


def _bytes_of(paths) -> np.ndarray:
    return np.frombuffer(b"\n".join(p.read_bytes() for p in paths), np.uint8).astype(np.int64)


def _train(args) -> transformers.LlamaForCausalLM:
    """A byte-level Llama fitted to docs/*.md (AdamW, random windows of ``--length`` bytes)."""
    data = torch.tensor(_bytes_of(sorted((ROOT / "docs").glob("*.md"))))
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=-(-args.hidden * 8 // 3 // 128) * 128,  # int4's groups of 128 divide it
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 128,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for step in range(args.steps):
        starts = rng.integers(0, len(data) - args.length - 1, args.batch)
        ids = torch.stack([data[s : s + args.length] for s in starts])
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"  train step {step:4d}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"training a byte-level Llama ({args.layers} layers, hidden {args.hidden}) on docs/*.md, {args.steps} steps")
    hf = _train(args)
    held = _bytes_of([ROOT / "README.md"])[: 4 * args.length]
    ids = jnp.asarray(held.reshape(4, args.length).astype(np.int32))
    prompt = ids[:1, : args.length // 2]
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        models = {"float32": mgjax.from_pretrained(tmp, dtype=jnp.float32)}
        for name in ("bfloat16", "int8", "int4"):
            models[name] = mgjax.from_pretrained(tmp, dtype=jnp.bfloat16)
            if name != "bfloat16":
                quant.quantize(models[name], name)
    logp = {n: jax.nn.log_softmax(m(ids)[0][:, :-1], -1) for n, m in models.items()}
    target = ids[:, 1:]
    ref = logp["float32"]
    print(f"held-out: README.md, {ids.size} bytes; decode: prompt {prompt.shape[1]} bytes, {args.new} new, greedy")
    print(f"mgjax on {jax.devices()[0].device_kind}")
    print(
        f"{'scheme':>9s} {'weights MiB':>11s} {'vs bf16':>7s} {'KL vs f32':>10s} {'top-1 = f32':>11s} "
        f"{'bits/byte':>9s} {'tok/s b1':>8s} {'vs bf16':>7s}"
    )
    rows = {}
    for name, model in models.items():
        lp = logp[name]
        kl = float(jnp.mean(jnp.sum(jnp.exp(ref) * (ref - lp), -1)))
        agree = float(jnp.mean(jnp.argmax(lp, -1) == jnp.argmax(ref, -1)))
        bits = float(-jnp.mean(jnp.take_along_axis(lp, target[..., None], -1)) / np.log(2))
        layers.unstack(model)
        seconds = median_seconds(lambda x: decoding.generate(model, x, args.new), prompt, repeats=args.repeats)
        rows[name] = (quant.weight_bytes(model), kl, agree, bits, args.new / seconds)
    base = rows["bfloat16"]
    for name, (size, kl, agree, bits, tps) in rows.items():
        print(
            f"{name:>9s} {size / 2**20:11.2f} {size / base[0]:7.2f} {kl:10.2e} {agree:11.1%} {bits:9.3f} "
            f"{tps:8.1f} {tps / base[4]:7.2f}"
        )


if __name__ == "__main__":
    main()
