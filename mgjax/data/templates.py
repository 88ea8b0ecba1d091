"""Conversation templates of the released MGM and Mini-InternVL models, and label masking by character spans.

A conversation (LLaVA/InternVL JSON: ``[{"from": "human"|"gpt", "value": ...}, ...]``) renders to segments of
text, each either trained (an answer and its closing separator) or not. Tokenising the *whole* text once and
labelling each token by where it ends reproduces the original token ids exactly and needs none of the
originals' per-round length arithmetic, which silently zeroes a sample's labels when it miscounts. A token that
straddles a trained/untrained boundary is an error naming the sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np

IGNORE_INDEX = -100
IMAGE = "<image>"
INTERNVL_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)


class TokenizationError(ValueError):
    """A sample whose tokens do not line up with its trained spans; the message names the sample."""


@dataclass(frozen=True)
class Template:
    """``system`` opens the text; a user turn is ``user + text + user_end``; an answer is ``assistant`` (not
    trained) + ``text + answer_end`` (trained); later rounds start with ``next_round``. ``image_first``: MGM moves
    ``<image>`` to the front of its turn as ``"<image>\\n" + text``; ``strip``: values are stripped (InternLM2);
    ``caption``: MGM's ``plain`` pretraining format (the human turn becomes a bare ``<image>``).
    ``generation_strip``: the generation prompt drops the assistant prefix's trailing space (SeparatorStyle TWO
    and LLAMA_2). ``stop``: where generation ends."""

    name: str
    system: str
    user: str
    user_end: str
    assistant: str
    answer_end: str
    stop: str
    next_round: str = ""
    image_first: bool = True
    strip: bool = False
    caption: bool = False
    generation_strip: bool = False


def _chatml(name: str, system: str, image_first: bool, strip: bool = False) -> Template:
    return Template(
        name,
        system,
        "<|im_start|>user\n",
        "<|im_end|>",
        "<|im_start|>assistant\n",
        "<|im_end|>",
        "<|im_end|>",
        image_first=image_first,
        strip=strip,
    )


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        # MGM (mgm/conversation.py)
        Template("plain", "", "", "", "", "\n", "\n", caption=True),
        Template("v1", VICUNA_SYSTEM + " ", "USER: ", " ", "ASSISTANT: ", "</s>", "</s>", generation_strip=True),
        Template(
            "gemma",
            "",
            "<start_of_turn>user\n",
            "<end_of_turn>\n",
            "<start_of_turn>model\n",
            "<end_of_turn>\n<eos>",
            "<end_of_turn>",
        ),
        # MGM's llama_3 labels the assistant turn with a *system* header (sic)
        Template(
            "llama_3",
            f"<|start_header_id|>system<|end_header_id|>\n\n{LLAMA3_SYSTEM}<|eot_id|>",
            "<|start_header_id|>user<|end_header_id|>\n\n",
            "<|eot_id|>",
            "<|start_header_id|>system<|end_header_id|>\n\n",
            "<|eot_id|>",
            "<|eot_id|>",
        ),
        Template(
            "mistral_instruct", "", "[INST] ", " [/INST]", " ", " </s>", "</s>", next_round="<s>", generation_strip=True
        ),
        _chatml("chatml_direct", "<|im_start|>system\nAnswer the questions.<|im_end|>", image_first=True),
        # Mini-InternVL (internvl_chat/internvl/conversation.py, SeparatorStyle.MPT: no newline after separators)
        _chatml("Hermes-2", f"<|im_start|>system\n{INTERNVL_SYSTEM}<|im_end|>", image_first=False),
        _chatml("internlm2-chat", f"<|im_start|>system\n{INTERNVL_SYSTEM}<|im_end|>", image_first=False, strip=True),
        Template(
            "phi3-chat",
            f"<|system|>\n{INTERNVL_SYSTEM}<|end|>",
            "<|user|>\n",
            "<|end|>",
            "<|assistant|>\n",
            "<|end|>",
            "<|end|>",
            image_first=False,
        ),
    )
}


class Segment(NamedTuple):
    text: str
    trained: bool


def get(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def _turns(conversation: Sequence[dict[str, Any]], sample: str) -> list[tuple[str, str]]:
    turns = [(t.get("from"), t.get("value")) for t in conversation]
    if turns and turns[0][0] != "human":  # LLaVA and InternVL drop a leading non-human turn
        turns = turns[1:]
    for i, (role, value) in enumerate(turns):
        want = ("human", "user") if i % 2 == 0 else ("gpt", "assistant")
        if role not in want or not isinstance(value, str):
            raise TokenizationError(
                f"sample {sample}: turn {i} is {role!r} with a {type(value).__name__} value; "
                f"conversations alternate human/gpt with text values"
            )
    return turns


def render(
    template: Template, conversation: Sequence[dict[str, Any]], *, sample: str = "?", generation: bool = False
) -> list[Segment]:
    """Segments of one conversation. ``generation``: end with the assistant prefix (a trailing user turn is the
    prompt) instead of requiring every question to have its answer."""
    t = template
    turns = _turns(conversation, sample)
    out = [Segment(t.system, False)] if t.system else []
    for i, (role, value) in enumerate(turns):
        value = value.strip() if t.strip else value
        if i % 2 == 0:
            if t.caption:
                value = IMAGE
            elif t.image_first and IMAGE in value:
                value = IMAGE + "\n" + value.replace(IMAGE, "").strip()
            out.append(Segment((t.next_round if i else "") + t.user + value + t.user_end, False))
        else:
            out.append(Segment(t.assistant, False))
            out.append(Segment(value + t.answer_end, True))
    if generation:
        if len(turns) % 2 == 0:
            raise TokenizationError(f"sample {sample}: a generation prompt must end with a human turn")
        out.append(Segment(t.assistant.rstrip(" ") if t.generation_strip else t.assistant, False))
    elif len(turns) % 2:
        raise TokenizationError(f"sample {sample}: the last human turn has no answer")
    return out


def expand_internvl_images(text: str, tiles: Sequence[int], tokens_per_tile: int) -> str:
    """Each ``<image>`` in order becomes ``<img>`` + ``<IMG_CONTEXT>`` x (tokens_per_tile x its tiles) + ``</img>``.
    ``tokens_per_tile`` is the model's (``InternVLConfig.tokens_per_tile``: 256 at 448 pixels): no default, so a
    model of another tile size cannot get a wrong count."""
    parts = text.split(IMAGE)
    if len(parts) - 1 != len(tiles):
        raise ValueError(f"{len(parts) - 1} <image> placeholders for {len(tiles)} images")
    out = [parts[0]]
    for n, rest in zip(tiles, parts[1:]):
        out.append("<img>" + "<IMG_CONTEXT>" * (tokens_per_tile * n) + "</img>" + rest)
    return "".join(out)


def _trained_chars(segments: Sequence[Segment]) -> np.ndarray:
    mask = np.zeros(sum(len(s.text) for s in segments), bool)
    at = 0
    for seg in segments:
        mask[at : at + len(seg.text)] = seg.trained
        at += len(seg.text)
    return mask


def encode(
    segments: Sequence[Segment], tokenizer, *, sample: str = "?", image_id: int | None = None, image_tokens: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and labels (``IGNORE_INDEX`` where not trained) of rendered segments.

    A token is trained when its last character is. With ``image_id`` (MGM), each ``<image>`` becomes
    ``image_tokens`` copies of ``image_id`` between separately tokenised chunks (MGM's ``tokenizer_image_token``
    with the placeholder expanded to a static run; the BOS only on the first chunk); otherwise the text is
    tokenised whole (InternVL: expand images first with ``expand_internvl_images``)."""
    text = "".join(s.text for s in segments)
    trained = _trained_chars(segments)
    chunks = text.split(IMAGE) if image_id is not None else [text]
    ids: list[int] = []
    labels: list[int] = []
    at = 0
    for i, chunk in enumerate(chunks):
        if i:
            ids += [image_id] * image_tokens
            labels += [IGNORE_INDEX] * image_tokens
            at += len(IMAGE)
        enc = tokenizer(chunk, add_special_tokens=i == 0, return_offsets_mapping=True)
        for tok, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
            ids.append(tok)
            if start == end:  # specials the tokenizer adds (BOS) cover no text: never trained
                labels.append(IGNORE_INDEX)
                continue
            start, end = start + at, end + at
            last = trained[end - 1]
            other = [c for c, t in zip(text[start:end], trained[start:end]) if t != last]
            if "".join(other).strip():
                piece = tokenizer.convert_ids_to_tokens(int(tok))
                raise TokenizationError(
                    f"sample {sample}: token {len(ids) - 1} {piece!r} straddles a prompt/answer "
                    f"boundary in {text[start:end]!r}; the template and tokenizer disagree"
                )
            labels.append(tok if last else IGNORE_INDEX)
        at += len(chunk)
    return np.asarray(ids, np.int64), np.asarray(labels, np.int64)
