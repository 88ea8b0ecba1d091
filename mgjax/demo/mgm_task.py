"""The embedded training demo's ingredients: a synthetic question-answering set in LLaVA JSON format, a word-level
tokenizer built offline, and a tiny MGM to train on a CPU.

Each 128-pixel image holds a coloured square, one to four dots and a short word in a 10-pixel font. The CLIP (low
resolution) view is 32 pixels: the square's colour survives the 4x downsampling, the dots are a pixel or two
and the word is illegible. Reading the word needs the 128-pixel ConvNeXt view that patch info mining brings in,
which is the paper's claim in miniature; README.md reports what a CPU budget actually shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mgjax.models.clip import CLIPVisionConfig
from mgjax.models.convnext import ConvNextConfig
from mgjax.models.decoder import LlamaConfig
from mgjax.models.mgm import MGMConfig

SIZE = 128  # the HR canvas; the LR view is SIZE // 4
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (225, 200, 30)}
TEXTS = ("cat", "dog", "sun", "box", "pen", "cup", "hat", "key")
COUNTS = ("one", "two", "three", "four")
QUESTIONS = {
    "color": "what color is the square ?",
    "count": "how many dots are there ?",
    "word": "what word is written ?",
}
SPECIALS = ["[PAD]", "[UNK]", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<image>"]
WORDS = (
    SPECIALS
    + ["system", "user", "assistant", "Answer", "the", "questions", "."]
    + sorted({w for q in QUESTIONS.values() for w in q.split()})
    + [*COLORS, *TEXTS, *COUNTS]
)
TEMPLATE = "chatml_direct"
TRAIN_FILE, EVAL_FILE = "train.json", "eval.json"  # under write_dataset's root


def model_config(*, mining: bool = True) -> MGMConfig:
    return MGMConfig(
        vision=CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=SIZE // 4,
            patch_size=8,
        ),
        vision_aux=ConvNextConfig(hidden_sizes=(32, 48, 64, 96), depths=(1, 1, 1, 1), final_norm=False),
        llm=LlamaConfig(
            vocab_size=len(WORDS),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=128,
        ),
        image_size_aux=SIZE,
        mining=mining,
    )


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", WORDS.index("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="[PAD]",
        unk_token="[UNK]",
        additional_special_tokens=SPECIALS[4:],
    )


def _place(rng: np.random.Generator, w: int, h: int, taken: list[tuple[int, int, int, int]], gap: int = 3):
    """A free spot for a w x h box (rejection sampling; the canvas is mostly empty)."""
    while True:
        x, y = int(rng.integers(2, SIZE - w - 2)), int(rng.integers(2, SIZE - h - 2))
        if not any(x < o[2] + gap and o[0] < x + w + gap and y < o[3] + gap and o[1] < y + h + gap for o in taken):
            taken.append((x, y, x + w, y + h))
            return x, y


def draw(rng: np.random.Generator) -> tuple[Image.Image, dict[str, str]]:
    """One image and its answers by question type."""
    font = ImageFont.load_default(size=10)
    img = Image.new("RGB", (SIZE, SIZE), (235, 235, 235))
    pen, taken = ImageDraw.Draw(img), []
    color, word, n = str(rng.choice(list(COLORS))), str(rng.choice(TEXTS)), int(rng.integers(1, len(COUNTS) + 1))
    side = int(rng.integers(20, 30))
    x, y = _place(rng, side, side, taken)
    pen.rectangle([x, y, x + side - 1, y + side - 1], fill=COLORS[color])
    left, top, right, bottom = pen.textbbox((0, 0), word, font=font)
    x, y = _place(rng, right - left, bottom - top, taken)
    pen.text((x - left, y - top), word, fill=(0, 0, 0), font=font)
    for _ in range(n):
        x, y = _place(rng, 7, 7, taken)
        pen.ellipse([x, y, x + 6, y + 6], fill=(60, 60, 60))
    return img, {"color": color, "count": COUNTS[n - 1], "word": word}


def _turns(kinds, answers) -> list[dict[str, str]]:
    turns = []
    for i, kind in enumerate(kinds):
        turns += [
            {"from": "human", "value": ("<image>\n" if i == 0 else "") + QUESTIONS[kind]},
            {"from": "gpt", "value": answers[kind]},
        ]
    return turns


def write_dataset(root: str | Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """Images under ``root/images``; ``train.json`` (every image with its three questions, in a random order)
    and ``eval.json`` (held-out images, one record per question, with its ``type``). Returns both paths."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train, held_out = [], []
    for i in range(n_train + n_eval):
        img, answers = draw(rng)
        name = f"images/{i}.png"
        img.save(root / name)
        if i < n_train:
            train.append(
                {"id": str(i), "image": name, "conversations": _turns(rng.permutation(list(QUESTIONS)), answers)}
            )
        else:
            held_out += [
                {"id": f"{i}-{kind}", "type": kind, "image": name, "conversations": _turns([kind], answers)}
                for kind in QUESTIONS
            ]
    paths = root / TRAIN_FILE, root / EVAL_FILE
    for path, records in zip(paths, (train, held_out)):
        path.write_text(json.dumps(records))
    return paths
