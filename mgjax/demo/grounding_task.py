"""The InternVL domain-adaptation demo's ingredients: general and domain data (InternVL meta files over JSONL
written by ``mgjax.data.formatters``), a byte-level BPE tokenizer trained offline on their text, and a tiny InternVL2
(InternViT -> pixel unshuffle -> MLP -> Qwen2) to train on a CPU.

Each 64-pixel image holds two squares of different colours, each in its own cell of a 3 x 3 grid. The general
data, which a first run trains the tiny model on (the "pretrained" model Mini-InternVL starts from), is region
perception for every colour (a box -> the colour of the square in it) and grounding of the red and green squares
(``<ref>the red square</ref>`` -> ``<box>[[x1,y1,x2,y2]]</box>`` in 0..1000). The domain is grounding of the blue
and yellow squares, which the general model has never been asked for. Images are cut into 2 x 2 tiles of 32 pixels
and a thumbnail (InternVL's dynamic tiling at ``max_dynamic_patch`` 4).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mgjax.data import formatters, templates
from mgjax.models.decoder import Qwen2Config
from mgjax.models.internvit import InternVisionConfig
from mgjax.models.internvl import InternVLConfig

SIZE, CELLS, SIDE = 64, 3, 16  # canvas, grid cells per side, square side (pixels)
TILE = 32
MAX_DYNAMIC_PATCH = 4
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (225, 200, 30)}
GENERAL_COLORS = ("red", "green")  # grounded in the general data; the others are the domain's
TEMPLATE = "Hermes-2"  # InternVL2-1B's
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
]
VOCAB = 512
META, GENERAL_META, EVAL_FILE = "domain_meta.json", "general_meta.json", "eval.jsonl"  # under write_dataset's root


def model_config(image_token_id: int) -> InternVLConfig:
    return InternVLConfig(
        vision=InternVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=TILE,
            patch_size=8,
        ),
        llm=Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=96,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        ),
        image_token_id=image_token_id,
        template=TEMPLATE,
    )


def _corpus() -> list[str]:
    """Every text the demo's records can hold, rendered as the template writes it (the tokenizer's training set)."""
    system = templates.get(TEMPLATE).system
    boxes = [json.dumps([_box(cell)]) for cell in range(CELLS * CELLS)]
    texts = [system] + [formatters.GROUNDING_QUESTION.replace("{expr}", f"the {c} square") for c in COLORS]
    texts += [formatters.REGION_LABEL_QUESTION.replace("{box}", b) for b in boxes]
    texts += [f"<ref>{c}</ref><box>{b}</box>" for c in COLORS for b in boxes]
    return texts * 4


def tokenizer():
    """Byte-level BPE (Qwen2's scheme: digits split one by one) trained on the demo's own text, with InternVL's
    special tokens; deterministic, so every process and every run builds the same one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        _corpus(),
        trainers.BpeTrainer(
            vocab_size=VOCAB,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=SPECIALS[1:]
    )


def _box(cell: int) -> list[int]:
    """The normalised box of a square centred in grid cell ``cell`` (row-major)."""
    x1, y1 = _corner(cell)
    return formatters.normalise_box("demo", (x1, y1, x1 + SIDE, y1 + SIDE), (SIZE, SIZE))


def _corner(cell: int) -> tuple[int, int]:
    pitch = SIZE / CELLS
    row, col = divmod(cell, CELLS)
    return int(col * pitch + (pitch - SIDE) / 2), int(row * pitch + (pitch - SIDE) / 2)


def draw(rng: np.random.Generator) -> tuple[Image.Image, dict[str, tuple[int, int, int, int]]]:
    """One image and its squares' pixel boxes by colour."""
    img = Image.new("RGB", (SIZE, SIZE), (235, 235, 235))
    pen = ImageDraw.Draw(img)
    colors = rng.choice(list(COLORS), 2, replace=False)
    cells = rng.choice(CELLS * CELLS, 2, replace=False)
    boxes = {}
    for color, cell in zip(colors, cells):
        x, y = _corner(int(cell))
        pen.rectangle([x, y, x + SIDE - 1, y + SIDE - 1], fill=COLORS[str(color)])
        boxes[str(color)] = (x, y, x + SIDE, y + SIDE)
    return img, boxes


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _meta(path: Path, name: str, annotation: str) -> None:
    path.write_text(json.dumps({name: {"root": ".", "annotation": annotation, "repeat_time": 1}}))


def write_dataset(root: str | Path, n_train: int = 1500, n_eval: int = 100, seed: int = 0) -> tuple[Path, Path, Path]:
    """Images under ``root/images``; the domain and general sets as InternVL meta files over JSONL annotations,
    and held-out domain records. Every training image gives a region record (general) and a grounding record for
    one of its squares (general or domain by colour). Returns (domain meta, general meta, held-out JSONL)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    domain, general, held_out = [], [], []
    for i in itertools.count():
        if len(held_out) == n_eval:
            break
        img, boxes = draw(rng)
        name = f"images/{i}.png"
        img.save(root / name)
        target, other = rng.permutation(list(boxes))
        record = formatters.grounding(f"g{i}", name, (SIZE, SIZE), f"the {target} square", boxes[target])
        if i >= n_train:
            if target not in GENERAL_COLORS:
                held_out.append(record)
            continue
        (general if target in GENERAL_COLORS else domain).append(record)
        general.append(formatters.region(f"r{i}", name, (SIZE, SIZE), boxes[other], other))
    _write_jsonl(root / "domain.jsonl", domain)
    _write_jsonl(root / "general.jsonl", general)
    _write_jsonl(root / EVAL_FILE, held_out)
    _meta(root / META, "synthetic_grounding", "domain.jsonl")
    _meta(root / GENERAL_META, "synthetic_regions", "general.jsonl")
    return root / META, root / GENERAL_META, root / EVAL_FILE
