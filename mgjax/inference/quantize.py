"""``python -m mgjax.quantize --model DIR --out DIR --quant int8``: a converted checkpoint with its LLM's linear
layers quantized (``mgjax.nn.quant``), written once so that serving loads the integers directly, without holding
the float model first (what ``--quant`` on loading does).

The other files of ``--model`` (tokenizer, chat template, generation and preprocessing settings) are copied beside
the new weights; ``config.json`` gets a ``quantization_config`` that ``from_pretrained`` reads back.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import jax.numpy as jnp

from mgjax.cli import HelpFormatter
from mgjax.nn import quant

WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m mgjax.quantize", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    ap.add_argument("--model", required=True, help="a converted checkpoint directory in float")
    ap.add_argument("--out", required=True, help="the directory the quantized checkpoint is written to (new or empty)")
    ap.add_argument("--quant", required=True, choices=sorted(quant.SCHEMES), help="int8 or int4 (see mgjax.nn.quant)")
    ap.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["float32", "bfloat16"],
        help="dtype of the parameters left in float (embeddings, LM head, norms, vision towers)",
    )
    return ap


def _copy_extras(src: Path, dst: Path) -> list[str]:
    """Every file of ``src`` but its weights and config (tokenizer, templates, generation settings)."""
    skip = {p for pattern in WEIGHT_FILES for p in src.glob(pattern)}
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and f not in skip:
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import mgjax  # noqa: PLC0415  (slow imports only a run needs)

    src, dst = Path(args.model), Path(args.out)
    try:
        if not (src / "config.json").is_file():
            raise ValueError(f"--model {src}: no config.json (not a converted checkpoint)")
        if dst.exists() and any(dst.iterdir()):
            raise ValueError(f"--out {dst}: not empty")
        model = mgjax.from_pretrained(src, dtype=jnp.dtype(args.dtype))
        if quant.scheme_of(model) is not None:
            raise ValueError(f"--model {src}: already quantized ({quant.scheme_of(model).name})")
        before = quant.weight_bytes(model)
        found = quant.quantize(model, args.quant)
        mgjax.save_pretrained(model, dst)
        copied = _copy_extras(src, dst)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    after = quant.weight_bytes(model)
    print(
        f"{dst}: {len(found)} linear layers in {args.quant}; weights {before / 2**20:.1f} MiB -> {after / 2**20:.1f} "
        f"MiB ({after / before:.2f}x); copied {', '.join(copied) or 'nothing else'}"
    )
    return 0
