"""One command for the day an accelerator is lent: every number docs/benchmarks.md wants from it, in one JSON.

    PYTHONPATH=. python bench/device_suite.py [--out bench/results/device_suite.json] [--smoke]

Runs on whatever jax finds (the GPU hosts we borrow bring their own jax and install nothing, hence PYTHONPATH),
each part on its own so that one failure is recorded and the rest still runs:

* ``decode``: greedy new tokens/s of mgjax's compiled decoding against transformers' ``generate`` on the same
  random Llama weights, batch 1 and 8, and whether both chose the same tokens;
* ``mining``: the window attention (the XLA reference; the Pallas kernel too on a TPU) forward and
  forward+backward over 16 images of MGM's 576 tokens, M = 8, C = 1024, as bytes moved per second against a
  measured copy (x + 1 over 1 GiB);
* ``train_step``: an MGM stage-2 step with Gemma-2B's widths (CLIP-L/336, ConvNeXt-L/768, mining M = 8; LLM
  depth ``--layers``), bf16 compute, full remat: tokens/s, MFU and peak device memory; the same step in PyTorch
  (transformers' towers and Gemma plus the MGM reference of ``tests/helpers.py``, bf16 autocast, gradient
  checkpointing, AdamW, the same batch) on the same device, and the ratio.

``--smoke`` runs every part on tiny shapes (on a CPU: tests/test_device_suite.py). Times exclude compilation.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: timing, decode, mining_attention
from timing import median_seconds  # noqa: E402

import mgjax  # noqa: E402
from mgjax.inference import decoding  # noqa: E402
from mgjax.models import mining  # noqa: E402
from mgjax.models.mgm import IMAGE_TOKEN_INDEX  # noqa: E402
from mgjax.nn import params  # noqa: E402
from mgjax.train import flops, optim  # noqa: E402
from mgjax.train.step import make_optimizer, train_step  # noqa: E402

# Gemma-2B's widths and MGM-2B's towers (CLIP-L/14 at 336 px, ConvNeXt-L at 768 px, 8 x 8 mining windows)
FULL = dict(
    clip=dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        hidden_act="quick_gelu",
    ),
    convnext=dict(hidden_sizes=[192, 384, 768, 1536], depths=[3, 3, 27, 3]),
    llm=dict(
        vocab_size=256000,
        hidden_size=2048,
        intermediate_size=16384,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        tie_word_embeddings=True,
    ),
    image_size_aux=768,
    batch=2,
    seq_len=2048,
    images=16,
    decode=dict(layers=8, hidden=1024, vocab=32000, new=128),
    repeats=5,
)
SMOKE = dict(
    clip=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
        hidden_act="quick_gelu",
    ),
    convnext=dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1]),
    llm=dict(
        vocab_size=160,
        hidden_size=48,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=12,
        tie_word_embeddings=True,
    ),
    image_size_aux=64,
    batch=2,
    seq_len=64,
    images=1,
    decode=dict(layers=2, hidden=128, vocab=256, new=8),
    repeats=2,
)


def environment() -> dict:
    d = jax.devices()[0]
    out = {
        "jax": jax.__version__,
        "device": d.device_kind,
        "platform": d.platform,
        "devices": jax.device_count(),
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import torch

        out.update(torch=torch.__version__, torch_cuda=torch.cuda.is_available())
    except ImportError:
        out["torch"] = None
    return out


def _peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


# ------------------------------------------------------------------------------------------------------ decode
def decode(s: dict) -> dict:
    import torch
    import transformers
    from decode import _torch_seconds

    d = s["decode"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = transformers.LlamaConfig(
        vocab_size=d["vocab"],
        hidden_size=d["hidden"],
        intermediate_size=d["hidden"] * 3,
        num_hidden_layers=d["layers"],
        num_attention_heads=d["hidden"] // 64,
        num_key_value_heads=max(1, d["hidden"] // 256),
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model = mgjax.from_pretrained(tmp, dtype=jnp.bfloat16)
    hf = hf.to(device)
    rows = {}
    for b in (1, 8):
        ids = np.random.default_rng(b).integers(1, d["vocab"], (b, 64)).astype(np.int32)
        ours_s = median_seconds(lambda x: decoding.generate(model, x, d["new"]), jnp.asarray(ids), repeats=s["repeats"])
        ours = np.asarray(decoding.generate(model, jnp.asarray(ids), d["new"]))
        theirs_s, theirs = _torch_seconds(
            hf, torch.tensor(ids, dtype=torch.long, device=device), d["new"], s["repeats"]
        )
        rows[f"batch_{b}"] = {
            "mgjax_tokens_per_s": b * d["new"] / ours_s,
            "transformers_tokens_per_s": b * d["new"] / theirs_s,
            "ratio": theirs_s / ours_s,
            "same_tokens": float(np.mean(ours[:, 64:] == theirs[:, 64:])),
        }
    return {
        "model": f"Llama {d['layers']} layers, hidden {d['hidden']}, vocab {d['vocab']}, bf16",
        "transformers_on": device,
        **rows,
    }


# ------------------------------------------------------------------------------------------------------ mining
def mining_attention(s: dict) -> dict:
    from mining_attention import copy_bandwidth

    m, c, tokens = 8, (1024 if s is FULL else 32), s["images"] * (576 if s is FULL else 16)
    copy = copy_bandwidth(s["repeats"])
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, tokens, c)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(1, m * m, tokens, c)), jnp.bfloat16) for _ in range(2))
    moved = {"forward": (2 + 2 * m * m) * c * 2 * tokens, "forward_backward": (5 + 6 * m * m) * c * 2 * tokens}
    out = {"copy_bytes_per_s": copy, "tokens": tokens, "M": m, "C": c}
    backends = ["xla"] + (["pallas"] if jax.devices()[0].platform == "tpu" else [])
    for backend in backends:
        fwd = jax.jit(lambda q, k, v: mining.local_window_attention(q, k, v, backend=backend))

        def loss(q, k, v, backend=backend):
            return jnp.sum(mining.local_window_attention(q, k, v, backend=backend).astype(jnp.float32))

        both = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        for name, fn in (("forward", fwd), ("forward_backward", both)):
            t = median_seconds(fn, q, k, v, repeats=s["repeats"])
            out[f"{backend}_{name}"] = {"seconds": t, "bytes_per_s": moved[name] / t, "of_copy": moved[name] / t / copy}
    return out


# ------------------------------------------------------------------------------------------------------ train step
def _reference(s: dict, layers: int):
    from tests.helpers import MGMReference

    modes = {"gemma": dict(image_grid=1, image_global=False, image_size_aux=s["image_size_aux"])}
    return MGMReference(
        "gemma", convnext=s["convnext"], clip=s["clip"], llm=dict(s["llm"], num_hidden_layers=layers), modes=modes
    )


def _batch(s: dict, tokens_per_image: int):
    """The PyTorch inputs (one -200 per row, spliced to ``seq_len``) and mgjax's (the placeholder expanded)."""
    import torch

    b, length, side = s["batch"], s["seq_len"], s["clip"]["image_size"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, s["llm"]["vocab_size"], (b, length - tokens_per_image + 1), generator=g)
    ids[:, 1] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:, :2] = -100
    expand = lambda x, fill: np.concatenate([x[:, :1], np.full((b, tokens_per_image), fill), x[:, 2:]], 1)  # noqa
    spliced_labels = expand(labels.numpy(), -100)  # both sides predict the same positions of the spliced sequence
    torch_batch = {
        "ids": ids,
        "labels": torch.from_numpy(spliced_labels),
        "images": torch.randn(b, 3, side, side, generator=g),
        "images_aux": torch.randn(b, 3, s["image_size_aux"], s["image_size_aux"], generator=g),
    }
    ours = {
        "input_ids": jnp.asarray(expand(ids.numpy(), IMAGE_TOKEN_INDEX)[None], jnp.int32),
        "labels": jnp.asarray(spliced_labels[None], jnp.int32),
        "images": jnp.asarray(torch_batch["images"].numpy()[None]),
        "images_aux": jnp.asarray(torch_batch["images_aux"].numpy()[None]),
    }
    return torch_batch, ours


def _torch_step(ref, batch: dict, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = ref.to(device).train()
    for tower in (ref.clip, ref.convnext):
        tower.requires_grad_(False)
    getattr(ref.llm, "activation_checkpointing_enable", ref.llm.gradient_checkpointing_enable)()
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-5)
    batch = {k: v.to(device) for k, v in batch.items()}

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = ref.logits(batch["ids"], batch["images"], batch["images_aux"])
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    first_loss = step()  # also the warm-up (allocator, cuBLAS plans)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {
        "seconds": float(np.median(times)),
        "on": device,
        "first_loss": first_loss,
        "peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
    }


def train_step_vs_pytorch(s: dict, layers: int) -> dict:
    ref = _reference(s, layers)
    with tempfile.TemporaryDirectory() as tmp:
        ref.checkpoint(Path(tmp))
        model = mgjax.from_pretrained(tmp, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat="full")
    opt = make_optimizer(model, optim.MGM_STAGE2, optim.OptimConfig(lr=1e-5), 100)
    torch_batch, ours = _batch(s, model.config.tokens_per_image)
    tokens = s["batch"] * s["seq_len"]
    first_loss = float(train_step(model, opt, ours)["loss"])  # also the compile; the same weights and batch as torch's
    ours_s = median_seconds(lambda b, m=model, o=opt: train_step(m, o, b)["loss"], ours, repeats=s["repeats"])
    step_flops = flops.mgm_step_flops(
        model, params.trainable(optim.MGM_STAGE2), batch=s["batch"], seq_len=s["seq_len"]
    )["total"]
    peak = flops.peak_flops()
    out = {
        "model": f"MGM stage 2, Gemma-2B widths with {layers} layers, bf16 compute, full remat",
        "batch": s["batch"],
        "seq_len": s["seq_len"],
        "mgjax": {
            "seconds": ours_s,
            "tokens_per_s": tokens / ours_s,
            "first_loss": first_loss,
            "mfu": step_flops / ours_s / peak if peak else None,
            "peak_bytes": _peak_bytes(),
        },
    }
    del model, opt
    theirs = _torch_step(ref, torch_batch, s["repeats"])
    out["pytorch"] = {**theirs, "tokens_per_s": tokens / theirs["seconds"]}
    out["ratio_tokens_per_s"] = theirs["seconds"] / ours_s
    return out


# ------------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/device_suite.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, measures nothing")
    ap.add_argument("--layers", type=int, default=6, help="LLM depth of the training step (Gemma-2B: 18)")
    args = ap.parse_args(argv)
    s = SMOKE if args.smoke else FULL
    result = {"environment": environment(), "smoke": args.smoke}
    parts = {
        "decode": lambda: decode(s),
        "mining": lambda: mining_attention(s),
        "train_step": lambda: train_step_vs_pytorch(s, 2 if args.smoke else args.layers),
    }
    for name, part in parts.items():
        start = time.time()
        try:
            result[name] = part()
        except Exception as e:  # noqa: BLE001  one part's failure is a result; the others still run
            result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        result[name]["wall_s"] = round(time.time() - start, 1)
        print(f"{name}: {json.dumps(result[name], default=str)[:600]}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str))  # what finished survives a timeout
    return 1 if any("error" in result[n] for n in parts) else 0


if __name__ == "__main__":
    sys.exit(main())
