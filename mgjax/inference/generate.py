"""``python -m mgjax.generate``: one prompt (and image) through any converted model, decoded by
``mgjax.inference.decoding``.

python -m mgjax.generate --model DIR [--image PATH] --prompt TEXT [--max-new-tokens 64] [--template NAME]
    [--temperature T --top-p P --top-k K --seed S] [--num-beams N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mgjax.cli import HelpFormatter, compilation_cache, integer, number
from mgjax.data import preprocess, samples, templates
from mgjax.inference.decoding import Sampling, beam_search, cut, generate
from mgjax.models import mgm_towers
from mgjax.models.mgm import IMAGE_TOKEN_INDEX
from mgjax.nn import layers, quant
from mgjax.parallel import mesh

# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


TEMPLATE_HELP = f"conversation template ({', '.join(templates.TEMPLATES)}; default: the model's own)"


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """The options every command that loads a model shares (generate, chat, serve, eval)."""
    ap.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["float32", "bfloat16"],
        help="dtype of the parameters, the computation and the KV cache",
    )
    ap.add_argument(
        "--quant",
        choices=sorted(quant.SCHEMES),
        help="weight-only quantization of the LLM's linear layers on loading: int8 (a scale per output channel) or "
        "int4 (a scale per 128 inputs); the float model is held once while it is quantized (python -m "
        "mgjax.quantize writes a quantized checkpoint that loads without that). Unset: the checkpoint's own",
    )
    ap.add_argument(
        "--mesh",
        help="split the model over this host's devices: AXIS=SIZE,... over data, fsdp, tensor, expert (training's mesh "
        "axes; fsdp takes the devices the others leave), e.g. tensor=8; each device loads only its shards. Unset: "
        "one device",
    )
    ap.add_argument("--towers-root", help=f"{mgm_towers.ROOT_HELP}; unset: only those two places are searched")
    ap.add_argument("--towers", default="mgm", choices=mgm_towers.SOURCES, help=mgm_towers.SOURCE_HELP)
    ap.add_argument(
        "--exif-transpose",
        action="store_true",
        help="turn images upright by their EXIF orientation first (MGM and InternVL do not)",
    )


def load_model(args: argparse.Namespace):
    """The model and tokenizer ``add_model_arguments``' options name."""
    import transformers  # noqa: PLC0415  (slow imports only a model run needs)

    import mgjax  # noqa: PLC0415

    _check_model_dir(args.model)
    devices = mesh.make_mesh(mesh.parse(args.mesh)) if args.mesh else None
    model = mgjax.from_pretrained(
        args.model, dtype=jnp.dtype(args.dtype), towers_root=args.towers_root, tower_source=args.towers, mesh=devices
    )
    if args.quant is not None:
        held = quant.scheme_of(model)
        if held is not None and held.name != args.quant:
            raise ValueError(f"--quant {args.quant}: --model {args.model} is already quantized ({held.name})")
        if held is None:
            quant.quantize(model, args.quant)
    layers.unstack(getattr(model, "language_model", model))  # decoding reads per-layer weights (layers.unstack)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {args.model}: no usable tokenizer files ({e})") from None
    return model, tokenizer


def _check_model_dir(model: str) -> None:
    """``--model`` checked before loading, so that its error names the flag (the loader's names its own
    parameters)."""
    path = Path(model)
    if not path.is_dir():
        raise ValueError(f"--model {model}: no such directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {model}: no config.json in {path.resolve()} (not a converted checkpoint)")


def warn_without_image(model, hint: str) -> None:
    """Say on stderr that a vision model was given no image: it then answers from the text alone, which reads as
    a wrong answer rather than a missing input. Plain LMs take no images and get no warning."""
    if hasattr(model, "language_model"):  # MGM and InternVL
        print(
            f"warning: {type(model).__name__} was given no image ({hint}); it answers from the text alone",
            file=sys.stderr,
        )


def answer_budget(model, prompt_tokens: int, max_new_tokens: int) -> int:
    """``max_new_tokens``, cut (with a warning) to what the model's context leaves after the prompt; a prompt that
    fills the context is a ``ValueError`` (it was answered from positions the model never trained on)."""
    lm = getattr(model, "language_model", model)
    context = lm.config.max_position_embeddings
    if prompt_tokens >= context:
        raise ValueError(
            f"the prompt is {prompt_tokens} tokens, the model's context {context} (max_position_embeddings): "
            "shorten the prompt or the conversation"
        )
    if prompt_tokens + max_new_tokens > context:
        print(
            f"warning: the answer is cut to {context - prompt_tokens} tokens: the prompt's {prompt_tokens} fill the "
            f"rest of the model's context of {context}",
            file=sys.stderr,
        )
    return min(max_new_tokens, context - prompt_tokens)


def default_template(model, tokenizer) -> str | None:
    """The conversation template a model was trained with (None: a plain LM, prompts sent as they are)."""
    c = model.config
    if hasattr(c, "template"):  # InternVL names its own
        return c.template or "Hermes-2"
    if hasattr(c, "vision_aux"):  # MGM: by family, as its CLI picks it
        family = c.llm.model_type
        if family == "gemma":
            return "gemma"
        if family == "mixtral":
            return "mistral_instruct"
        vocab = tokenizer.get_vocab()
        return "llama_3" if "<|eot_id|>" in vocab else "chatml_direct" if "<|im_start|>" in vocab else "v1"
    return None


def conversation_inputs(
    model, tokenizer, template: str | None, conversation: list[dict], images: list
) -> tuple[np.ndarray, dict]:
    """Token ids [1, T] of a conversation ending on a human turn, ready for the answer, and the image arguments
    of ``model.embed``: one image per ``<image>`` of the turns, in order (MGM takes one per conversation)."""
    c = model.config
    marks = sum(str(t.get("value", "")).count(templates.IMAGE) for t in conversation)
    if marks != len(images):
        raise ValueError(
            f"the conversation has {marks} {templates.IMAGE} placeholders but {len(images)} image"
            f"{'s were' if len(images) != 1 else ' was'} given"
        )
    if template is None:
        if images:
            raise ValueError("a text-only model cannot take images")
        text = "\n".join(str(t.get("value", "")) for t in conversation)
        return np.asarray([tokenizer(text)["input_ids"]]), {}
    segments = templates.render(templates.get(template), conversation, generation=True)
    if hasattr(c, "vision_aux"):  # MGM
        if len(images) > 1:
            raise ValueError("an MGM model takes one image per conversation")
        ids, _ = templates.encode(segments, tokenizer, image_id=IMAGE_TOKEN_INDEX, image_tokens=c.tokens_per_image)
        if not images:
            return ids[None], {}
        pixels, aux = samples.mgm_pixels(c, images[0])
        return ids[None], {"images": jnp.asarray(pixels[None]), "images_aux": jnp.asarray(aux[None])}
    text = "".join(s.text for s in segments)
    if not images:
        return templates.encode([templates.Segment(text, False)], tokenizer)[0][None], {}
    pixels = [preprocess.internvl_pixels(img, image_size=c.vision.image_size) for img in images]
    text = templates.expand_internvl_images(text, [len(p) for p in pixels], c.tokens_per_tile)
    ids = templates.encode([templates.Segment(text, False)], tokenizer)[0]
    token = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    return ids[None], {"pixel_values": jnp.asarray(np.concatenate(pixels)), "image_token_id": token}


def batch_embeds(model, ids: jax.Array, image_args: list[dict]) -> jax.Array | None:
    """The input embeddings of a left-padded batch ``ids`` [B, T] whose rows had ``conversation_inputs``' image
    arguments ``image_args`` (one dict per row, empty for a text-only row); None when no row has an image.
    InternVL rows may mix (their tiles are concatenated in row order); MGM's ``embed`` wants all rows or none."""
    rows = [a for a in image_args if a]
    if not rows:
        return None
    if "pixel_values" in rows[0]:
        return model.embed(
            ids, jnp.concatenate([a["pixel_values"] for a in rows]), image_token_id=rows[0]["image_token_id"]
        )
    return model.embed(ids, **{k: jnp.concatenate([a[k] for a in rows]) for k in ("images", "images_aux")})


def _inputs(model, tokenizer, template, prompt: str, image) -> tuple[np.ndarray, dict]:
    """One question (and image) as ``conversation_inputs`` takes it; a missing placeholder goes first, as both
    codebases put it."""
    if image is not None and templates.IMAGE not in prompt:
        prompt = templates.IMAGE + "\n" + prompt
    return conversation_inputs(
        model, tokenizer, template, [{"from": "human", "value": prompt}], [] if image is None else [image]
    )


def stop_ids(tokenizer, template: str | None) -> tuple[int, ...]:
    """The tokens that end an answer: the tokenizer's EOS and the last token of the template's stop string."""
    stops = {tokenizer.eos_token_id} - {None}
    if template is not None:
        stops |= set(tokenizer(templates.get(template).stop, add_special_tokens=False)["input_ids"][-1:])
    return tuple(sorted(stops))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m mgjax.generate", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    ap.add_argument(
        "--model", required=True, help="a converted checkpoint directory (config.json, safetensors, tokenizer files)"
    )
    ap.add_argument(
        "--prompt", required=True, help=f"the question (an --image goes before it unless it holds {templates.IMAGE})"
    )
    ap.add_argument("--image", help="an image file (MGM and InternVL models; default: none, the text alone)")
    ap.add_argument(
        "--template",
        help=f"conversation template ({', '.join(templates.TEMPLATES)}), or 'none' to send the prompt as is "
        "(default: the model's own)",
    )
    ap.add_argument("--max-new-tokens", type=integer(1), default=64, help="the answer's budget, in tokens")
    add_model_arguments(ap)
    ap.add_argument("--temperature", type=number(0), default=0.0, help="sampling temperature; 0: greedy")
    ap.add_argument(
        "--top-p",
        type=number(0, 1),
        default=1.0,
        help="sample from the fewest most likely tokens whose probabilities sum to P; 1: all",
    )
    ap.add_argument("--top-k", type=integer(0), default=0, help="sample from the K most likely tokens; 0: all")
    ap.add_argument("--num-beams", type=integer(1), default=1, help="beam search with N beams; 1: no beam search")
    ap.add_argument("--seed", type=integer(0, 2**32 - 1), default=0, help="the sampling's random seed")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    compilation_cache()
    try:
        model, tokenizer = load_model(args)
        image = preprocess.load_image(args.image, exif_transpose=args.exif_transpose) if args.image else None
        template = (
            default_template(model, tokenizer)
            if args.template is None
            else (None if args.template == "none" else args.template)
        )
        ids, image_args = _inputs(model, tokenizer, template, args.prompt, image)
        budget = answer_budget(model, ids.shape[1], args.max_new_tokens)
        sampling = Sampling(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, num_beams=args.num_beams, seed=args.seed
        )
    except (ValueError, OSError) as e:  # CheckpointError, ImageError, TokenizationError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    if image is None:
        warn_without_image(model, "--image PATH gives it one")
    ids = jnp.asarray(ids, jnp.int32)
    lm = getattr(model, "language_model", model)
    embeds = model.embed(ids, **image_args) if image_args else None
    stops = stop_ids(tokenizer, template)
    if sampling.num_beams > 1:
        new = beam_search(lm, ids, budget, sampling=sampling, inputs_embeds=embeds, stop_ids=stops)[0]
    else:
        out = generate(lm, ids, budget, inputs_embeds=embeds, sampling=sampling, stop_ids=stops)
        new = np.asarray(out)[0, ids.shape[1] :].tolist()
    print(tokenizer.decode(cut(new, stops), skip_special_tokens=True))
    return 0
