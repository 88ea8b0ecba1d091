"""InternVL annotation records -> training inputs: dynamic tiles with the per-image budget, the <IMG_CONTEXT> runs
they need, labels on the answers only, tile slots a batch can stack, and the model reading each row's own slots."""

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import mgjax
from mgjax.data import samples, templates
from tests.helpers import TINY_INTERNVL

SPECIALS = ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<image>"]
WORDS = [
    "<s>",
    "[PAD]",
    "[UNK]",
    *SPECIALS,
    "system",
    "user",
    "assistant",
    "What",
    "is",
    "it",
    "?",
    "A",
    "cat",
    ".",
    "Compare",
    "them",
    "Same",
    "\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", pad_token="[PAD]", unk_token="[UNK]", additional_special_tokens=SPECIALS
    )


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (90, 30), (200, 10, 10)).save(tmp_path / "wide.png")  # 3:1 -> a 3x1 grid
    Image.new("RGB", (30, 30), (10, 200, 10)).save(tmp_path / "square.png")
    return tmp_path


def _make(tokenizer, folder, **kw):
    return samples.InternVLSamples(TINY_INTERNVL, tokenizer, "Hermes-2", str(folder), **{"max_length": 160, **kw})


def _record(image, question="What is it ?", answer="A cat ."):
    return {
        "id": "r1",
        "image": image,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
    }


def test_one_image_is_tiled_prepended_and_only_the_answer_is_trained(tokenizer, folder):
    out = _make(tokenizer, folder, max_dynamic_patch=6, tile_slots=5)(_record("wide.png"))
    assert int(out["tiles"]) == 4  # 3 tiles + the thumbnail
    context = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert int((out["input_ids"] == context).sum()) == 4 * TINY_INTERNVL.tokens_per_tile
    assert np.abs(out["pixel_values"][:4]).sum(axis=(1, 2, 3)).min() > 0 and not out["pixel_values"][4].any()
    trained = tokenizer.decode(out["input_ids"][out["labels"] != templates.IGNORE_INDEX])
    assert trained.split() == ["A", "cat", ".", "<|im_end|>"]
    text = tokenizer.decode(out["input_ids"][out["attention_mask"]])
    assert text.index("<img>") < text.index("What")  # <image> went in front of the question


def test_several_images_share_the_patch_budget(tokenizer, folder):
    two = _record(["wide.png", "wide.png"], question="<image> <image> Compare them")
    out = _make(tokenizer, folder, max_dynamic_patch=6, tile_slots=8)(two)
    assert int(out["tiles"]) == 8  # 6 // 2 = 3 tiles each, and a thumbnail each
    with pytest.raises(samples.BadSample, match="too many tiles"):
        _make(tokenizer, folder, max_dynamic_patch=6, tile_slots=6)(two)
    with pytest.raises(samples.BadSample, match="<image> count mismatch"):
        _make(tokenizer, folder)(_record(["wide.png", "square.png"]))
    with pytest.raises(samples.BadSample, match="over-length"):
        _make(tokenizer, folder, max_length=20)(_record("wide.png"))


def test_the_model_reads_each_rows_own_tile_slots(tokenizer, folder):
    make = _make(tokenizer, folder, max_dynamic_patch=6, tile_slots=5)
    rows = [make(_record("wide.png")), make(_record("square.png", answer="Same ."))]
    assert [int(r["tiles"]) for r in rows] == [4, 1]
    model = mgjax.init(TINY_INTERNVL, seed=0)
    ids = jnp.asarray(np.stack([r["input_ids"] for r in rows]))
    token = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    slotted = model.embed(ids, jnp.asarray(np.stack([r["pixel_values"] for r in rows])), image_token_id=token)
    # the same tiles concatenated without slots: the row-major order transformers and InternVL use
    tiles = np.concatenate([r["pixel_values"][: int(r["tiles"])] for r in rows])
    flat = model.embed(ids, jnp.asarray(tiles), image_token_id=token)
    assert float(jnp.max(jnp.abs(slotted - flat))) <= 1e-6  # the ViT ran on 10 tiles instead of 5: float noise
