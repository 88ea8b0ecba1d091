"""``python -m mgjax.chat --model DIR [--image PATH]``: a multi-turn terminal chat with any converted model, answers
streamed as they decode.

Commands at the prompt: ``/image PATH`` attaches an image to your next message (InternVL takes any number in a
conversation, MGM one), ``/reset`` starts a new conversation, ``/quit`` (or end of input) leaves. ``--gen`` asks
an MGM model for an image with every message (MGM's `` <GEN>``); with ``--sd-model DIR`` (a local diffusers
pipeline) the prompt it writes inside ``<h>…</h>`` is drawn and saved under ``--image-dir``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

import jax.numpy as jnp

from mgjax.cli import HelpFormatter, compilation_cache, integer, number
from mgjax.data import preprocess, templates
from mgjax.inference import decoding, imagegen
from mgjax.inference.generate import (
    TEMPLATE_HELP,
    add_model_arguments,
    answer_budget,
    conversation_inputs,
    default_template,
    load_model,
    stop_ids,
    warn_without_image,
)


@dataclass
class Chat:
    """A conversation with a model: ``say`` streams the answer's text as it grows and keeps both turns."""

    model: Any
    tokenizer: Any
    template: str | None
    max_new_tokens: int = 512
    sampling: decoding.Sampling = decoding.Sampling()
    turns: list[dict] = field(default_factory=list)
    images: list = field(default_factory=list)
    pending: list = field(default_factory=list)  # images attached to the next message
    gen: bool = False  # ask for an image with every message (MGM)
    draw: imagegen.TextToImage | None = None
    image_dir: str = "runs/chat_images"
    exif_transpose: bool = False
    last_image: Any = None  # the path of the image drawn for the last answer, if any

    def attach(self, path: str) -> None:
        self.pending.append(preprocess.load_image(path, exif_transpose=self.exif_transpose))

    def reset(self) -> None:
        self.turns, self.images, self.pending = [], [], []

    def say(self, text: str) -> Iterator[str]:
        """The answer's new text, piece by piece. The turn is kept only once the answer is complete."""
        text = templates.IMAGE + "\n" + text if self.pending and templates.IMAGE not in text else text
        text = imagegen.ask_for_image(text) if self.gen else text
        turns, images = [*self.turns, {"from": "human", "value": text}], [*self.images, *self.pending]
        ids, image_args = conversation_inputs(self.model, self.tokenizer, self.template, turns, images)
        budget = answer_budget(self.model, ids.shape[1], self.max_new_tokens)
        ids = jnp.asarray(ids, jnp.int32)
        lm = getattr(self.model, "language_model", self.model)
        embeds = self.model.embed(ids, **image_args) if image_args else None
        stops = stop_ids(self.tokenizer, self.template)
        tokens, shown = [], ""
        for step in decoding.stream(lm, ids, budget, inputs_embeds=embeds, sampling=self.sampling, stop_ids=stops):
            tokens.append(int(step[0]))
            answer = self.tokenizer.decode(decoding.cut(tokens, stops), skip_special_tokens=True)
            if answer.startswith(shown) and answer != shown:  # a byte-level piece may complete a character later
                yield answer[len(shown) :]
                shown = answer
            if tokens[-1] in stops:
                break
        self.turns = [*turns, {"from": "gpt", "value": shown}]
        self.images, self.pending = images, []
        self.last_image = (
            imagegen.imagine(shown, self.draw, self.image_dir, f"{len(self.turns) // 2:03d}")
            if self.draw is not None
            else None
        )


def _lines() -> Iterator[str]:
    """Lines of standard input; prompted when it is a terminal."""
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    while True:
        try:
            yield input("you> ")
        except EOFError:
            return


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m mgjax.chat",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[1],
        formatter_class=HelpFormatter,
    )
    ap.add_argument("--model", required=True, help="a converted checkpoint directory (with tokenizer files)")
    ap.add_argument("--image", help="an image for the first message (default: none; /image PATH attaches one later)")
    ap.add_argument("--template", help=TEMPLATE_HELP)
    ap.add_argument("--max-new-tokens", type=integer(1), default=512, help="each answer's budget, in tokens")
    ap.add_argument("--temperature", type=number(0), default=0.0, help="sampling temperature; 0: greedy")
    ap.add_argument(
        "--top-p",
        type=number(0, 1),
        default=1.0,
        help="sample from the fewest most likely tokens whose probabilities sum to P; 1: all",
    )
    add_model_arguments(ap)
    ap.add_argument("--gen", action="store_true", help="ask for an image with every message (MGM's <GEN>)")
    ap.add_argument(
        "--sd-model",
        help="a local diffusers pipeline directory that draws the <h>...</h> prompts (default: none, nothing drawn)",
    )
    ap.add_argument("--sd-steps", type=integer(1), default=50, help="denoising steps per drawn image")
    ap.add_argument("--image-dir", default="runs/chat_images", help="where drawn images are saved")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    compilation_cache()
    try:
        model, tokenizer = load_model(args)
        chat = Chat(
            model,
            tokenizer,
            args.template or default_template(model, tokenizer),
            args.max_new_tokens,
            decoding.Sampling(temperature=args.temperature, top_p=args.top_p),
            gen=args.gen,
            draw=imagegen.DiffusersBackend(args.sd_model, steps=args.sd_steps) if args.sd_model else None,
            image_dir=args.image_dir,
            exif_transpose=args.exif_transpose,
        )
        if args.image:
            chat.attach(args.image)
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in _lines():
        line = line.strip()
        if not line:
            continue
        command, _, rest = line.partition(" ")
        try:
            if command == "/quit":
                break
            if command == "/reset":
                chat.reset()
                print("(new conversation)")
            elif command == "/image":
                chat.attach(rest.strip())
                print(f"(image attached to your next message: {rest.strip()})")
            else:
                if not (chat.turns or chat.pending or chat.gen):  # --gen's text-to-image needs no image given
                    warn_without_image(chat.model, "/image PATH attaches one to your next message")
                print("model> ", end="", flush=True)
                for piece in chat.say(line):
                    print(piece, end="", flush=True)
                print(f"\n(image: {chat.last_image})" if chat.last_image else "")
        except (ValueError, OSError) as e:  # a bad image or an image too many: say so, keep the conversation
            print(f"error: {e}", file=sys.stderr)
    return 0
