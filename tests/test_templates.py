"""Conversation templates: exact rendered text for every released model (hand-written from the original code's
formats), and labels that train exactly each answer plus its closing separator, with a tokenizer built offline."""

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from mgjax.data import templates as T

SPECIALS = [
    "</s>",
    "<eos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "[INST]",
    "[/INST]",
    "<|im_start|>",
    "<|im_end|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<image>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
]
CONVERSATION = [
    {"from": "human", "value": "What is this?\n<image>"},
    {"from": "gpt", "value": "A red cat."},
    {"from": "human", "value": "And its size?"},
    {"from": "gpt", "value": "Small."},
]
S = T.INTERNVL_SYSTEM
EXPECTED = {  # the whole training text for CONVERSATION
    "v1": f"{T.VICUNA_SYSTEM} USER: <image>\nWhat is this? ASSISTANT: A red cat.</s>USER: And its size? "
    "ASSISTANT: Small.</s>",
    "gemma": "<start_of_turn>user\n<image>\nWhat is this?<end_of_turn>\n<start_of_turn>model\nA red cat."
    "<end_of_turn>\n<eos><start_of_turn>user\nAnd its size?<end_of_turn>\n<start_of_turn>model\nSmall."
    "<end_of_turn>\n<eos>",
    "llama_3": f"<|start_header_id|>system<|end_header_id|>\n\n{T.LLAMA3_SYSTEM}<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is this?<|eot_id|>"
    "<|start_header_id|>system<|end_header_id|>\n\nA red cat.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nAnd its size?<|eot_id|>"
    "<|start_header_id|>system<|end_header_id|>\n\nSmall.<|eot_id|>",
    "mistral_instruct": "[INST] <image>\nWhat is this? [/INST] A red cat. </s><s>[INST] And its size? [/INST] "
    "Small. </s>",
    "chatml_direct": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is this?"
    "<|im_end|><|im_start|>assistant\nA red cat.<|im_end|><|im_start|>user\nAnd its size?<|im_end|>"
    "<|im_start|>assistant\nSmall.<|im_end|>",
    "Hermes-2": f"<|im_start|>system\n{S}<|im_end|><|im_start|>user\nWhat is this?\n<image><|im_end|>"
    "<|im_start|>assistant\nA red cat.<|im_end|><|im_start|>user\nAnd its size?<|im_end|>"
    "<|im_start|>assistant\nSmall.<|im_end|>",
    "phi3-chat": f"<|system|>\n{S}<|end|><|user|>\nWhat is this?\n<image><|end|><|assistant|>\nA red cat.<|end|>"
    "<|user|>\nAnd its size?<|end|><|assistant|>\nSmall.<|end|>",
}
TRAINED = {
    "v1": ["A red cat.</s>", "Small.</s>"],
    "gemma": ["A red cat.<end_of_turn>\n<eos>", "Small.<end_of_turn>\n<eos>"],
    "llama_3": ["A red cat.<|eot_id|>", "Small.<|eot_id|>"],
    "mistral_instruct": ["A red cat. </s>", "Small. </s>"],
    "chatml_direct": ["A red cat.<|im_end|>", "Small.<|im_end|>"],
    "Hermes-2": ["A red cat.<|im_end|>", "Small.<|im_end|>"],
    "phi3-chat": ["A red cat.<|end|>", "Small.<|end|>"],
}
GENERATION_END = {
    "v1": "ASSISTANT:",
    "gemma": "<start_of_turn>model\n",
    "mistral_instruct": "[/INST]",
    "llama_3": "<|start_header_id|>system<|end_header_id|>\n\n",
    "Hermes-2": "<|im_start|>assistant\n",
    "phi3-chat": "<|assistant|>\n",
    "chatml_direct": "<|im_start|>assistant\n",
}


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained here on a little text, with every template's special tokens and a BOS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [T.VICUNA_SYSTEM, T.LLAMA3_SYSTEM, "What is this? A red cat. And its size? Small.", "hello " * 50] * 20
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=700, special_tokens=["<s>", *SPECIALS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", additional_special_tokens=SPECIALS
    )


@pytest.mark.parametrize("name", list(EXPECTED))
def test_rendered_text_and_trained_spans(name, tokenizer):
    segments = T.render(T.get(name), CONVERSATION, sample="s1")
    assert "".join(s.text for s in segments) == EXPECTED[name]
    assert [s.text for s in segments if s.trained] == TRAINED[name]
    ids, labels = T.encode(segments, tokenizer, sample="s1")
    assert ids[0] == tokenizer.bos_token_id and labels[0] == T.IGNORE_INDEX
    assert tokenizer.decode(ids[1:]) == EXPECTED[name]  # one tokenisation of the whole text
    trained = labels != T.IGNORE_INDEX
    assert (labels[trained] == ids[trained]).all()
    # exactly the answers and their separators are trained, in one run per answer (a first answer token that
    # carries the space before it, as byte-level and SentencePiece tokens do, is trained: it ends in the answer)
    runs = np.split(ids[trained], np.flatnonzero(np.diff(np.flatnonzero(trained)) > 1) + 1)
    assert [tokenizer.decode(r).lstrip(" ") for r in runs] == TRAINED[name]


@pytest.mark.parametrize("name", list(GENERATION_END))
def test_generation_prompt(name):
    segments = T.render(T.get(name), CONVERSATION[:1], generation=True)
    text = "".join(s.text for s in segments)
    assert text.endswith(GENERATION_END[name]) and not any(s.trained for s in segments)


def test_plain_caption_and_mgm_image_run(tokenizer):
    conv = [{"from": "human", "value": "Describe <image> briefly."}, {"from": "gpt", "value": "A red cat."}]
    segments = T.render(T.get("plain"), conv)
    assert "".join(s.text for s in segments) == "<image>A red cat.\n"
    ids, labels = T.encode(segments, tokenizer, image_id=-200, image_tokens=5)
    assert list(ids[:6]) == [tokenizer.bos_token_id] + [-200] * 5
    assert (labels[:6] == T.IGNORE_INDEX).all()
    assert tokenizer.decode(ids[6:]) == "A red cat.\n" and (labels[6:] == ids[6:]).all()


def test_internlm2_strips_and_internvl_expands_images(tokenizer):
    conv = [{"from": "human", "value": "  <image>\nWhat is this?  "}, {"from": "gpt", "value": " A red cat. "}]
    text = "".join(s.text for s in T.render(T.get("internlm2-chat"), conv))
    assert "<|im_start|>user\n<image>\nWhat is this?<|im_end|><|im_start|>assistant\nA red cat.<|im_end|>" in text
    expanded = T.expand_internvl_images(text, [3], tokens_per_tile=4)
    assert "<img>" + "<IMG_CONTEXT>" * 12 + "</img>\nWhat" in expanded
    ids, labels = T.encode([T.Segment(expanded, False)], tokenizer)
    context = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert (ids == context).sum() == 12 and (labels == T.IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="1 <image> placeholders for 2 images"):
        T.expand_internvl_images(text, [1, 2], tokens_per_tile=4)


def test_a_straddling_token_is_an_error_naming_the_sample(tokenizer):
    assert len(tokenizer("hello", add_special_tokens=False)["input_ids"]) == 1
    with pytest.raises(T.TokenizationError, match="sample img-42: token 1 .* straddles"):
        T.encode([T.Segment("hel", False), T.Segment("lo", True)], tokenizer, sample="img-42")


def test_malformed_conversations_are_named():
    with pytest.raises(T.TokenizationError, match="sample 7: turn 1 is 'human'"):
        T.render(T.get("v1"), [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], sample="7")
    with pytest.raises(T.TokenizationError, match="sample 8: the last human turn has no answer"):
        T.render(T.get("v1"), CONVERSATION[:3], sample="8")
    with pytest.raises(ValueError, match="unknown conversation template 'vicuna'"):
        T.get("vicuna")


def test_grounding_answers_train_their_ref_and_box_tokens(tokenizer):
    answer = "<ref>a red cat</ref><box>[[10, 20, 300, 400]]</box>"
    conv = [{"from": "human", "value": "<image>\nWhere is the cat?"}, {"from": "gpt", "value": answer}]
    ids, labels = T.encode(T.render(T.get("Hermes-2"), conv), tokenizer)
    trained = labels[labels != T.IGNORE_INDEX]
    assert tokenizer.decode(trained) == answer + "<|im_end|>"
    for special in ("<ref>", "</ref>", "<box>", "</box>"):  # each one token, trained
        assert tokenizer.convert_tokens_to_ids(special) in trained
