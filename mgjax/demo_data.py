"""The embedded training demo's ingredients: a synthetic captioning set in LLaVA JSON format (coloured squares
at one of four places), a word-level tokenizer built offline, and a tiny MGM to train on a CPU."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from mgjax.models.clip import CLIPVisionConfig
from mgjax.models.convnext import ConvNextConfig
from mgjax.models.decoder import LlamaConfig
from mgjax.models.mgm import MGMConfig

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
PLACES = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}
SPECIALS = ["[PAD]", "[UNK]", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<image>"]
WORDS = SPECIALS + ["system", "user", "assistant", "Answer", "the", "questions", ".", "what", "is", "in", "this",
                    "image", "?", "a", "square", "at", "top", "bottom", "left", "right", *COLORS]
TEMPLATE = "chatml_direct"


def model_config() -> MGMConfig:
    return MGMConfig(
        vision=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                image_size=28, patch_size=7),
        vision_aux=ConvNextConfig(hidden_sizes=(16, 32, 48, 64), depths=(1, 1, 1, 1), final_norm=False),
        llm=LlamaConfig(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128),
        image_size_aux=64)


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", WORDS.index("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="[PAD]",
                                   unk_token="[UNK]", additional_special_tokens=SPECIALS[4:])


def write_dataset(root: str | Path, n: int = 256, seed: int = 0) -> Path:
    """``n`` images and ``data.json`` under ``root``; returns the JSON's path."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        color, place = rng.choice(list(COLORS)), rng.choice(list(PLACES))
        img = np.full((64, 64, 3), 235, np.uint8)
        r, c = PLACES[place]
        y, x = r * 32 + rng.integers(2, 10), c * 32 + rng.integers(2, 10)
        img[y:y + 20, x:x + 20] = COLORS[color]
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        records.append({"id": str(i), "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is in this image ?"},
            {"from": "gpt", "value": f"a {color} square at the {place} ."}]})
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path
