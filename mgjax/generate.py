"""Greedy decoding with a KV cache, and ``python -m mgjax.generate``: one prompt (and image) through any model.

One compiled prefill and one compiled single-token step, each taking the model's (hashable) graphdef as a static
argument, so they compile once per model structure and shape. Sampling, beam search, batching across requests
and streaming belong to the serving work.

    python -m mgjax.generate --model DIR [--image PATH] --prompt TEXT [--max-new-tokens 64] [--template NAME]
"""
from __future__ import annotations

import argparse
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgjax import preprocess, samples, templates
from mgjax.models.mgm import IMAGE_TOKEN_INDEX


@partial(jax.jit, static_argnums=(0, 4))
def _prefill(graphdef, state, ids, embeds, max_len):
    model = nnx.merge(graphdef, state)
    embeds = model.embed(ids) if embeds is None else embeds
    logits, cache = model(inputs_embeds=embeds, cache=model.init_cache(ids.shape[0], max_len))
    return jnp.argmax(logits[:, -1], -1).astype(ids.dtype), cache


@partial(jax.jit, static_argnums=0, donate_argnums=3)  # the cache is updated in place
def _step(graphdef, state, token, cache):
    logits, cache = nnx.merge(graphdef, state)(token[:, None], cache=cache)
    return jnp.argmax(logits[:, -1], -1).astype(token.dtype), cache


def reencode_length(config) -> int | None:
    """The sequence length at which cached keys go stale. LongRoPE (Phi-3) rotates *every* position with its long
    factors once a forward sees more than the original context, so keys cached under the short factors must be
    recomputed; transformers' ``generate`` re-encodes the whole sequence at that point, and so do we."""
    rope = getattr(config, "rope", None)
    if rope is not None and rope.type == "longrope":
        return rope.original_max_position_embeddings + 1
    return None


def greedy(model: nnx.Module, input_ids: jax.Array, max_new_tokens: int, *, inputs_embeds: jax.Array | None = None,
           stop_ids: tuple[int, ...] = ()) -> jax.Array:
    """Append up to ``max_new_tokens`` argmax tokens to ``input_ids`` [B, T]. ``model`` is a causal LM;
    ``inputs_embeds`` [B, T, D] replaces the prompt's embeddings (a VLM's ``embed`` output, images merged).
    Decoding stops early once every row has produced one of ``stop_ids`` (rows that stopped keep going, as
    transformers' un-padded greedy does; callers cut at the first stop)."""
    graphdef, state = nnx.split(model)
    max_len = input_ids.shape[1] + max_new_tokens
    token, cache = _prefill(graphdef, state, input_ids, inputs_embeds, max_len)
    out = [token]
    done = np.isin(np.asarray(token), stop_ids)
    restart = reencode_length(model.config)
    while len(out) < max_new_tokens and not done.all():
        if input_ids.shape[1] + len(out) == restart:
            new = jnp.stack(out, 1)
            embeds = None if inputs_embeds is None else jnp.concatenate([inputs_embeds, model.embed(new)], 1)
            token, cache = _prefill(graphdef, state, jnp.concatenate([input_ids, new], 1), embeds, max_len)
        else:
            token, cache = _step(graphdef, state, token, cache)
        out.append(token)
        done |= np.isin(np.asarray(token), stop_ids)
    return jnp.concatenate([input_ids, jnp.stack(out, axis=1)], axis=1)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def _default_template(model, tokenizer) -> str | None:
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


def _inputs(model, tokenizer, template, prompt: str, image) -> tuple[np.ndarray, dict]:
    """Token ids [1, T] and the image arguments of ``model.embed``."""
    c = model.config
    n_placeholders = prompt.count(templates.IMAGE)
    n_images = int(image is not None)
    if image is not None and n_placeholders == 0:
        prompt = templates.IMAGE + "\n" + prompt  # both codebases put a missing image first
    elif n_placeholders != n_images:
        raise ValueError(f"the prompt has {n_placeholders} {templates.IMAGE} placeholders but {n_images} image"
                         f"{'s were' if n_images != 1 else ' was'} given")
    if template is None:
        if image is not None:
            raise ValueError("a text-only model cannot take --image")
        return np.asarray([tokenizer(prompt)["input_ids"]]), {}
    segments = templates.render(templates.get(template), [{"from": "human", "value": prompt}], generation=True)
    if hasattr(c, "vision_aux"):  # MGM
        ids, _ = templates.encode(segments, tokenizer, image_id=IMAGE_TOKEN_INDEX, image_tokens=c.tokens_per_image)
        if image is None:
            return ids[None], {}
        images, aux = samples.mgm_pixels(c, image)
        return ids[None], {"images": jnp.asarray(images[None]), "images_aux": jnp.asarray(aux[None])}
    text = "".join(s.text for s in segments)
    if image is None:
        return templates.encode([templates.Segment(text, False)], tokenizer)[0][None], {}
    pixels = preprocess.internvl_pixels(image, image_size=c.vision.image_size)
    text = templates.expand_internvl_images(text, [len(pixels)], c.tokens_per_tile)
    ids = templates.encode([templates.Segment(text, False)], tokenizer)[0]
    token = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    return ids[None], {"pixel_values": jnp.asarray(pixels), "image_token_id": token}


def stop_ids(tokenizer, template: str | None) -> tuple[int, ...]:
    """The tokens that end an answer: the tokenizer's EOS and the last token of the template's stop string."""
    stops = {tokenizer.eos_token_id} - {None}
    if template is not None:
        stops |= set(tokenizer(templates.get(template).stop, add_special_tokens=False)["input_ids"][-1:])
    return tuple(sorted(stops))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mgjax.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a converted checkpoint directory (config.json, safetensors, "
                                                    "tokenizer files)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--image", help="an image file (MGM and InternVL models)")
    ap.add_argument("--template", help=f"conversation template ({', '.join(templates.TEMPLATES)}); default: the "
                                       "model's own; 'none' sends the prompt as is")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)

    import transformers  # noqa: PLC0415  (a slow import only the command line needs)

    import mgjax  # noqa: PLC0415
    try:
        model = mgjax.from_pretrained(args.model, dtype=jnp.dtype(args.dtype))
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError) as e:
            raise ValueError(f"{args.model}: no usable tokenizer files ({e})") from None
        image = preprocess.load_image(args.image) if args.image else None
        template = _default_template(model, tokenizer) if args.template is None else (
            None if args.template == "none" else args.template)
        ids, image_args = _inputs(model, tokenizer, template, args.prompt, image)
    except (ValueError, OSError) as e:  # CheckpointError, ImageError, TokenizationError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids = jnp.asarray(ids, jnp.int32)
    lm = getattr(model, "language_model", model)
    embeds = model.embed(ids, **image_args) if image_args else None
    stops = stop_ids(tokenizer, template)
    out = np.asarray(greedy(lm, ids, args.max_new_tokens, inputs_embeds=embeds, stop_ids=stops))[0]
    new = list(out[ids.shape[1]:])
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    print(tokenizer.decode(new[:cut], skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
