"""Scoring of the benchmarks Mini-Gemini and Mini-InternVL report, by the rules of each benchmark's official
evaluator, in pure Python (no model, no GPT judge). The eval CLI calls ``score(task, records)``.

Every record is one question: ``question_id`` (unique), ``answer`` (the model's raw output) and the task's
ground-truth fields below; ``text`` (the prompt), ``image`` and ``category`` are optional unless listed. Every raw
answer is ``.strip()``-ed first, as both reference pipelines (LLaVA's ``model_vqa*`` and InternVL's
``model.chat``) strip the decoded text before their scorers see it. Accuracies are fractions in [0, 1]; MME keeps
its 0-200-per-subtask scale and OCRBench its count of right answers.

- ``textvqa``: ``answers`` (the 10 human answers). VQA accuracy of LLaVA/InternVL ``m4c_evaluator``
  (EvalAI normalisation of both sides; mean over the leave-one-annotator-out subsets of min(1, matches / 3)).
  The official tool asserts exactly 10 answers; any non-empty list is accepted here (leave-one-out over n).
- ``pope``: ``label`` (yes/no). LLaVA ``eval_pope.py``: the text before the first ".", commas dropped, is "no" if
  one of its space-separated words is ``No``, ``not`` or ``no``, else "yes". Summary: accuracy, precision, recall,
  F1 (positive = yes) and yes_ratio over all records, and the same per ``category`` when records have one (the
  papers report the per-category or category-mean values). A zero denominator gives 0.0 where the official
  script raises ZeroDivisionError.
- ``mme``: ``category`` (one of the 14 subtasks), ``image``, ``label`` (yes/no). MME ``eval_tool/calculation.py``:
  the lowercased answer is yes/no, else its first four characters decide (``yes`` before ``no``), else "other".
  Per subtask: acc = 100 * right / questions, acc+ = 100 * images with every question right / images, score =
  acc + acc+. The official tool pairs consecutive lines of a subtask file; questions are grouped by ``image``
  here, so a subtask's questions need not be adjacent.
- ``mmbench``: ``options`` ({"A": text, ...}), ``label`` (letter), ``index`` (shared by the rotated copies of one
  question). VLMEvalKit ``can_infer``: ``.()[],:;!*#{}`` become spaces and a single option letter among the words
  is the answer (a word ``Z`` alone, or a stock refusal, gives "Z"); else the single option whose text is
  contained in the lowercased answer. VLMEvalKit's quantifier guard for a lone "A" only runs with ``VERBOSE`` set,
  so it is not applied. What neither rule reads is wrong and counted in ``unparsed``: the official tool would ask
  a GPT judge, which is not used here (its ``exact_matching`` policy gives "Z" too). Circular evaluation: a
  question (``index``) is right only if every copy is.
- ``scienceqa``: ``options`` (list of choice texts, at most five), ``label`` (index of the right one).
  LLaVA-1.5 ``eval_science_qa.py`` (the version the Mini-Gemini code base carries): the answer is a letter
  A-E, or starts with "X. ", or contains exactly one ``The answer is X.``; anything else is FAILED (wrong,
  ``unparsed``). ``img_accuracy`` is over records with a non-empty ``image`` (LLaVA checks the prompt for
  ``<image>``).
- ``gqa``: ``label``. LLaVA ``convert_gqa_for_eval.py`` + GQA ``eval.py``: the answer with trailing periods
  stripped and lowercased must equal the label exactly. GQA keeps articles and other punctuation, and does not
  normalise the (already lowercase) label either.
- ``mmmu``: ``question_type`` ("multiple-choice"/"open"), ``options`` (list, multiple-choice), ``label`` (letter,
  or the answer string or list of strings for open questions). MMMU ``eval_utils.py``: ``(X)``, then `` X ``,
  then (answers of more than five words) an option's text, the last occurrence winning; open answers give key
  phrases and their numbers, matched as ``eval_open``. Where nothing parses MMMU picks a random option from a
  global ``random.seed(42)`` stream; here ``random.Random(str(question_id))`` makes the pick independent of
  record order, and such records are counted in ``unparsed``.
- ``mathvista``: ``question_type`` ("multi_choice"/"free_form"), ``answer_type`` ("text"/"integer"/"float"/
  "list"), ``precision`` (float answers), ``choices`` (multiple choice), ``label``. MathVista ``extract_answer.py``
  without its GPT step: the answer already a choice, an integer/float answer that parses, ``The answer is "X".``
  (its ``--quick_extract`` rule). Added rules stand in for the GPT extractor, each reading only an explicit
  answer: InternVL's ``Answer: X`` rule, ``The answer is X`` unquoted, a bare option letter (``B``, ``(B)``,
  ``B.``, ``B. text``) or a ``(B)`` anywhere for multiple choice, the single number of an integer/float answer,
  and the whole answer for text/list answers. An answer no rule reads is wrong and counted in ``unparsed``
  (the official pipeline would ask GPT, or with no API would map "" to the shortest choice). Then
  ``calculate_score.py``: multiple choice takes a ``(X)`` letter, a letter, or else the choice nearest by edit
  distance; integers ``str(int(float(x)))``, floats ``str(round(float(x), precision))``; string equality with
  the label.
- ``ai2d``: ``options`` (list), ``label`` (letter or index). InternVL's ``evaluate_vqa.py`` exact match of the
  stripped, lowercased answer with the letter; where that fails, the MMBench letter rules above (VLMEvalKit
  scores AI2D that way), so ``(B)`` or the option's text also count. ``unparsed`` counts answers neither reads.
- ``chartqa``: ``label`` (string or list). Relaxed accuracy of pix2struct (as InternVL): numbers (a trailing "%"
  divides by 100) within 5% of a non-zero target, ``<=``, else case-insensitive exact match; best over labels.
- ``docvqa`` / ``infovqa``: ``answers`` (list). ANLS of the DocVQA/InfographicsVQA RRC evaluator: edit distance of
  the lowercased, whitespace-collapsed strings over the longer raw length, similarity ``1 - min`` over answers,
  0 below 0.5 (exactly 0.5 is kept).
- ``ocrbench``: ``category`` (one of the 10 OCRBench categories), ``answers`` (list or string). OCRBench's rule:
  right if a reference is a substring of the answer, both stripped with newlines as spaces; lowercased, except
  for Handwritten Mathematical Expression Recognition (HME100k), where all spaces go and case is kept. The
  summary ``score`` counts right answers (out of 1000 on the full benchmark).

A record missing a field, or with a malformed one, is a ValueError naming its question_id: the data is broken,
not the model.
"""

from __future__ import annotations

import random
import re
import string
from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

TASKS: tuple[str, ...] = (
    "textvqa",
    "pope",
    "mme",
    "mmbench",
    "scienceqa",
    "gqa",
    "mmmu",
    "mathvista",
    "ai2d",
    "chartqa",
    "docvqa",
    "infovqa",
    "ocrbench",
)

Record = dict[str, Any]
Result = dict[str, Any]


# ----------------------------------------------------------------------------------------------- records


def _qid(record: Record) -> Any:
    return record["question_id"]


def _field(record: Record, name: str, kind: type | tuple[type, ...] | None = None) -> Any:
    if name not in record:
        raise ValueError(f"question_id {_qid(record)!r}: missing field {name!r}")
    value = record[name]
    if kind is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise ValueError(f"question_id {_qid(record)!r}: field {name!r} is {type(value).__name__}")
    return value


def _strings(record: Record, name: str) -> list[str]:
    """A field holding one reference string or a non-empty list of them."""
    value = _field(record, name, (str, list))
    values = [value] if isinstance(value, str) else value
    if not values or not all(isinstance(v, str) for v in values):
        raise ValueError(f"question_id {_qid(record)!r}: field {name!r} must be a string or non-empty string list")
    return values


def _choice(record: Record, name: str, allowed: Iterable[str]) -> str:
    value = _field(record, name, str)
    if value not in allowed:
        raise ValueError(f"question_id {_qid(record)!r}: field {name!r} is {value!r}, not one of {sorted(allowed)}")
    return value


def _prepare(records: Sequence[Record]) -> list[Record]:
    if not records:
        raise ValueError("no records to score")
    seen: set = set()
    prepared = []
    for i, record in enumerate(records):
        if "question_id" not in record:
            raise ValueError(f"record #{i}: missing field 'question_id'")
        if _qid(record) in seen:
            raise ValueError(f"repeated question_id {_qid(record)!r}")
        seen.add(_qid(record))
        prepared.append(dict(record, answer=_field(record, "answer", str).strip()))
    return prepared


def _result(record: Record, right: bool | float, **extra: Any) -> Result:
    return {"question_id": _qid(record), "right": right, **extra}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _unparsed(results: Sequence[Result]) -> int:
    return sum(bool(r.get("unparsed")) for r in results)


def _plain(results: list[Result], metric: str) -> dict:
    return {"summary": {metric: _mean([float(r["right"]) for r in results])}, "results": results}


def _with_unparsed(results: list[Result]) -> dict:
    summary = {"accuracy": _mean([float(r["right"]) for r in results]), "unparsed": _unparsed(results)}
    return {"summary": summary, "results": results}


def levenshtein(a: str, b: str) -> int:
    """Edit distance with unit insertions, deletions and substitutions."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


# ------------------------------------------------------------------------------------ TextVQA (EvalAI)

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_VQA_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_PERIOD = re.compile(r"\.(?!\d)")  # EvalAI's "(?!<=\d)" is a lookahead that never fires: only the digit test acts

# The spellings EvalAI repairs. A form with one apostrophe is looked up without it; a form with several is looked
# up with any single one missing ("hed've", "he'dve"), never with all of them gone ("hedve").
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am mightn't mightn't've might've "
    "mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've "
    "somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've "
    "something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas "
    "wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've "
    "who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd "
    "you'd've you'll you're you've"
).split()


def _misspellings(form: str) -> list[str]:
    gaps = [i for i, c in enumerate(form) if c == "'"]
    if len(gaps) == 1:
        return [form.replace("'", "")]
    return [form[:i] + form[i + 1 :] for i in gaps]


_CONTRACTIONS = {typo: form for form in _CONTRACTED for typo in _misspellings(form)}
# EvalAI's table maps this one backwards; kept, since the official scores carry it.
_CONTRACTIONS["somebody'd"] = "somebodyd"


def vqa_normalize(text: str) -> str:
    """EvalAI's answer processing (``EvalAIAnswerProcessor`` of LLaVA's and InternVL's ``m4c_evaluator``)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_words(_vqa_punctuation(text))


def _vqa_punctuation(text: str) -> str:
    out = text
    for mark in _VQA_PUNCTUATION:
        # A mark beside a space anywhere in the original is deleted everywhere; otherwise it splits words.
        beside_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if beside_space else " ")
    # EvalAI passes re.UNICODE (32) where re.sub takes ``count``: only the first 32 periods are removed.
    return _PERIOD.sub("", out, count=32)


def _vqa_words(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQA accuracy of an already normalised prediction against normalised human answers."""
    matches = sum(ref == prediction for ref in references)
    # Dropping annotator i removes one match exactly when annotator i gave the predicted answer.
    return _mean([min(1.0, (matches - (ref == prediction)) / 3) for ref in references])


def _score_textvqa(records: list[Record]) -> dict:
    results = []
    for record in records:
        prediction = vqa_normalize(record["answer"])
        references = [vqa_normalize(a) for a in _strings(record, "answers")]
        results.append(_result(record, vqa_accuracy(prediction, references), pred=prediction))
    return _plain(results, "accuracy")


# ------------------------------------------------------------------------------------------------ POPE


def pope_parse(answer: str) -> str:
    """LLaVA ``eval_pope.py``: yes unless the first sentence has a negating word."""
    words = answer.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "not", "no"}.intersection(words) else "yes"


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def binary_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE's metrics with "yes" as the positive class."""
    pairs = list(zip(predictions, labels))
    tp = pairs.count(("yes", "yes"))
    fp = pairs.count(("yes", "no"))
    tn = pairs.count(("no", "no"))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + pairs.count(("no", "yes")))
    return {
        "accuracy": (tp + tn) / len(pairs),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": list(predictions).count("yes") / len(pairs),
    }


def _score_pope(records: list[Record]) -> dict:
    results, by_category = [], defaultdict(list)
    for record in records:
        label = _choice(record, "label", ("yes", "no"))
        prediction = pope_parse(record["answer"])
        results.append(_result(record, prediction == label, pred=prediction))
        if "category" in record:
            by_category[record["category"]].append((prediction, label))
    summary: dict[str, Any] = binary_metrics([r["pred"] for r in results], [r["label"] for r in records])
    if by_category:
        summary["categories"] = {c: binary_metrics(*zip(*pairs)) for c, pairs in sorted(by_category.items())}
    return {"summary": summary, "results": results}


# ------------------------------------------------------------------------------------------------- MME

MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_parse(answer: str) -> str:
    """MME ``calculation.py``: yes/no, else whichever the first four characters hold, else "other"."""
    text = answer.lower()
    if text in ("yes", "no"):
        return text
    for word in ("yes", "no"):
        if word in text[:4]:
            return word
    return "other"


def mme_category_score(rights_by_image: dict[Any, list[bool]]) -> dict[str, float]:
    rights = [r for group in rights_by_image.values() for r in group]
    acc = 100 * _mean([float(r) for r in rights])
    acc_plus = 100 * _mean([float(all(group)) for group in rights_by_image.values()])
    return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}


def _score_mme(records: list[Record]) -> dict:
    results, groups = [], defaultdict(lambda: defaultdict(list))
    for record in records:
        category = _choice(record, "category", MME_PERCEPTION + MME_COGNITION)
        label = _field(record, "label", str).lower()
        if label not in ("yes", "no"):
            raise ValueError(f"question_id {_qid(record)!r}: field 'label' is {label!r}, not yes/no")
        prediction = mme_parse(record["answer"])
        results.append(_result(record, prediction == label, pred=prediction))
        groups[category][_field(record, "image")].append(prediction == label)
    categories = {c: mme_category_score(groups[c]) for c in MME_PERCEPTION + MME_COGNITION if c in groups}
    summary = {
        "perception": sum(v["score"] for c, v in categories.items() if c in MME_PERCEPTION),
        "cognition": sum(v["score"] for c, v in categories.items() if c in MME_COGNITION),
        "categories": categories,
    }
    return {"summary": summary, "results": results}


# --------------------------------------------------------------------------- MMBench / AI2D (VLMEvalKit)

_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_OPTION_SEPARATORS = re.compile(r"[.()\[\],:;!*#{}]")


def _letter_among_words(answer: str, options: dict[str, str]) -> str | None:
    if "Failed to obtain answer via API" in answer:
        return None
    if any(refusal in answer for refusal in _REFUSALS):
        return "Z"
    words = _OPTION_SEPARATORS.sub(" ", answer).split()
    letters = [letter for letter in options if letter in words]
    if len(letters) == 1:
        return letters[0]
    if not letters and "Z" in words:
        return "Z"
    return None


def _option_in_text(answer: str, options: dict[str, str]) -> str | None:
    text = answer.lower()
    letters = [letter for letter, option in options.items() if option.lower() in text]
    return letters[0] if len(letters) == 1 else None


def infer_option(answer: str, options: dict[str, str]) -> str | None:
    """VLMEvalKit ``can_infer``: the option an answer names, "Z" for a refusal, None if the rules cannot tell."""
    return _letter_among_words(answer, options) or _option_in_text(answer, options)


def _letter_options(record: Record) -> dict[str, str]:
    options = _field(record, "options", dict)
    kept = {k: v for k, v in options.items() if v is not None}
    if not kept or not all(k in string.ascii_uppercase and len(k) == 1 and isinstance(v, str) for k, v in kept.items()):
        raise ValueError(f"question_id {_qid(record)!r}: field 'options' must map letters to option texts")
    return kept


def _score_mmbench(records: list[Record]) -> dict:
    results, groups = [], defaultdict(list)
    for record in records:
        options = _letter_options(record)
        label = _choice(record, "label", options)
        prediction = infer_option(record["answer"], options)
        results.append(_result(record, prediction == label, pred=prediction, unparsed=prediction is None))
        groups[_field(record, "index")].append(prediction == label)
    summary = {
        "accuracy": _mean([float(all(g)) for g in groups.values()]),
        "vanilla_accuracy": _mean([float(r["right"]) for r in results]),
        "unparsed": _unparsed(results),
    }
    return {"summary": summary, "results": results}


def _list_options(record: Record, name: str) -> list[str]:
    options = _field(record, name, list)
    if not options or len(options) > 26 or not all(isinstance(o, str) for o in options):
        raise ValueError(f"question_id {_qid(record)!r}: field {name!r} must be a list of 1-26 strings")
    return options


def _letter_label(record: Record, count: int) -> str:
    label = _field(record, "label", (str, int))
    letters = string.ascii_uppercase[:count]
    if isinstance(label, int) and 0 <= label < count:
        return letters[label]
    if isinstance(label, str) and len(label) == 1 and label in letters:
        return label
    raise ValueError(f"question_id {_qid(record)!r}: field 'label' {label!r} names no option")


def _score_ai2d(records: list[Record]) -> dict:
    results = []
    for record in records:
        options = _list_options(record, "options")
        label = _letter_label(record, len(options))
        exact = record["answer"].lower() == label.lower()
        prediction = label if exact else infer_option(record["answer"], dict(zip(string.ascii_uppercase, options)))
        results.append(_result(record, prediction == label, pred=prediction, unparsed=prediction is None))
    return _with_unparsed(results)


# ------------------------------------------------------------------------------------------- ScienceQA

_SQA_LETTERS = "ABCDE"
_SQA_SENTENCE = re.compile(r"The answer is ([A-Z]).")  # the "." is any character, as in LLaVA


def scienceqa_parse(answer: str) -> str | None:
    """LLaVA-1.5 ``eval_science_qa.py``: the letter an answer gives, or None (its FAILED)."""
    if answer in _SQA_LETTERS:
        return answer
    if len(answer) >= 3 and answer[0] in _SQA_LETTERS and answer[1:3] == ". ":
        return answer[0]
    found = _SQA_SENTENCE.findall(answer)
    return found[0] if len(found) == 1 else None


def _score_scienceqa(records: list[Record]) -> dict:
    results, with_image = [], []
    for record in records:
        options = _list_options(record, "options")
        if len(options) > len(_SQA_LETTERS):
            raise ValueError(f"question_id {_qid(record)!r}: ScienceQA questions have at most five options")
        label = _field(record, "label", int)
        if not 0 <= label < len(options):
            raise ValueError(f"question_id {_qid(record)!r}: field 'label' {label} names no option")
        letter = scienceqa_parse(record["answer"])
        right = letter is not None and _SQA_LETTERS.find(letter) == label
        results.append(_result(record, right, pred=letter, unparsed=letter is None))
        if record.get("image"):
            with_image.append(float(right))
    out = _with_unparsed(results)
    if with_image:
        out["summary"]["img_accuracy"] = _mean(with_image)
    return out


# ------------------------------------------------------------------------------------------------- GQA


def gqa_normalize(answer: str) -> str:
    """LLaVA ``convert_gqa_for_eval.py``; GQA's ``eval.py`` then compares strings exactly."""
    return answer.rstrip(".").lower()


def _score_gqa(records: list[Record]) -> dict:
    results = []
    for record in records:
        prediction = gqa_normalize(record["answer"])
        results.append(_result(record, prediction == _field(record, "label", str), pred=prediction))
    return _plain(results, "accuracy")


# ------------------------------------------------------------------------------------------------ MMMU

_MMMU_EDGES = ",.!?;:'"
_MMMU_KEYS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_MMMU_TRIVIAL = frozenset(":,.!?;'")
# MMMU splits on ". " before a capital, but only after lowercasing the response: in effect only lines split.
_MMMU_SENTENCES = re.compile(r"\.\s(?=[A-Z])|\n")
_MMMU_NUMBERS = (
    re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"),  # 1,234,567
    re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),  # 1.5e-3
    re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"),  # 12, 1.5, .5 not part of the above
)


def _mmmu_candidates(padded: str, letters: str, options: Sequence[str]) -> dict[str, int]:
    """Candidate letters with the position of their last mention, by the first rule that finds any."""
    for form in ("({})", " {} "):
        found = {c: padded.rfind(form.format(c)) for c in letters if form.format(c) in padded}
        if found:
            return found
    if len(padded.split()) <= 5:
        return {}
    text = padded.lower()
    return {c: text.rfind(o.lower()) for c, o in zip(letters, options) if o.lower() in text}


def mmmu_parse_choice(answer: str, options: Sequence[str], question_id: Any) -> tuple[str, bool]:
    """MMMU ``parse_multi_choice_response``: (letter, parsed). An unparsed answer gets a seeded random letter."""
    letters = string.ascii_uppercase[: len(options)]
    for edge in _MMMU_EDGES:
        answer = answer.strip(edge)
    candidates = _mmmu_candidates(f" {answer} ", letters, options)
    if not candidates:
        return random.Random(str(question_id)).choice(letters), False
    return max(candidates, key=candidates.__getitem__), True


def _mmmu_shortest_tail(sentence: str, keys: Sequence[str]) -> str | None:
    best = None
    for key in keys:
        if key in sentence:
            tail = sentence.split(key)[-1].strip()
            # An empty tail does not count as found, so a later key may still replace it (as in MMMU).
            if not best or len(tail) < len(best):
                best = tail
    return best


def _mmmu_key_phrases(answer: str) -> list[str]:
    answer = answer.strip().strip(".").lower()
    sentences = _MMMU_SENTENCES.split(answer)
    phrases = []
    for i, sentence in enumerate(sentences):
        # Only the last sentence may be a bare equation.
        keys = _MMMU_KEYS + ("=",) if i == len(sentences) - 1 else _MMMU_KEYS
        tail = _mmmu_shortest_tail(sentence, keys)
        if tail and tail not in _MMMU_TRIVIAL:
            phrases.append(tail)
    return phrases or [answer]


def _mmmu_numbers(text: str) -> list[str]:
    return [n for pattern in _MMMU_NUMBERS for n in pattern.findall(text)]


def _mmmu_float(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def mmmu_normalize(text: str) -> list[float | str]:
    """MMMU ``normalize_str``: a number rounded to 2 places, else lowercase text (a single character padded)."""
    text = text.strip()
    number = _mmmu_float(text)
    if number is not None:
        return [round(number, 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def mmmu_parse_open(answer: str) -> list[float | str]:
    """MMMU ``parse_open_response``: the normalised key phrases and the numbers in them."""
    phrases = _mmmu_key_phrases(answer)
    found = phrases + [n for p in phrases for n in _mmmu_numbers(p)]
    unique: list[float | str] = []
    for value in (v for text in found for v in mmmu_normalize(text)):
        if value not in unique:
            unique.append(value)
    return unique


def mmmu_open_right(label: str | Sequence[str], predictions: Sequence[float | str]) -> bool:
    """MMMU ``eval_open``: a gold string inside a predicted string, or a gold number equal to a predicted one."""
    golds = [g for text in ([label] if isinstance(label, str) else label) for g in mmmu_normalize(str(text))]
    for prediction in predictions:
        if isinstance(prediction, str):
            if any(isinstance(g, str) and g in prediction for g in golds):
                return True
        elif prediction in golds:
            return True
    return False


def _mmmu_record(record: Record) -> Result:
    kind = _choice(record, "question_type", ("multiple-choice", "open"))
    label = _field(record, "label", (str, list))
    if kind == "open":
        predictions = mmmu_parse_open(record["answer"])
        return _result(
            record, mmmu_open_right(_strings(record, "label"), predictions), pred=predictions, unparsed=False
        )
    letter, parsed = mmmu_parse_choice(record["answer"], _list_options(record, "options"), _qid(record))
    right = letter in label if isinstance(label, list) else letter == label
    return _result(record, right, pred=letter, unparsed=not parsed)


def _score_mmmu(records: list[Record]) -> dict:
    return _with_unparsed([_mmmu_record(record) for record in records])


# ------------------------------------------------------------------------------------------- MathVista

_MV_QUOTED = re.compile(r'The answer is "(.*)"\.')  # MathVista's quick rule
_MV_ANSWER_COLON = re.compile(r"(?:Final answer:|Answer:)\s*(.*)", re.IGNORECASE)  # InternVL's quick rule
_MV_ANSWER_IS = re.compile(r"the answer is:?\s*(.*)", re.IGNORECASE)
_MV_LETTER = re.compile(r"\(?([A-Z])\)?\.?|([A-Z])[.:)]\s.*", re.DOTALL)
_MV_BRACKETED = re.compile(r"\(([a-zA-Z])\)")
_MV_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _mathvista_official(answer: str, record: Record) -> str | None:
    """The rules of MathVista's ``extract_answer`` that run before its GPT call."""
    if record["question_type"] == "multi_choice" and answer in record.get("choices", []):
        return answer
    for kind, convert in (("integer", int), ("float", float)):
        if record["answer_type"] == kind:
            try:
                return str(convert(answer))
            except ValueError:
                pass
    quoted = _MV_QUOTED.search(answer)
    return quoted.group(1) if quoted else None


def _mathvista_added(answer: str, record: Record) -> str | None:
    """Stand-ins for the GPT extractor that read only an explicitly given answer."""
    for pattern in (_MV_ANSWER_COLON, _MV_ANSWER_IS):
        found = pattern.search(answer)
        if found and found.group(1).strip().rstrip("."):
            return found.group(1).strip().rstrip(".").strip()
    if record["question_type"] == "multi_choice":
        letter = _MV_LETTER.fullmatch(answer)
        if letter:
            return letter.group(1) or letter.group(2)
        return answer if _MV_BRACKETED.search(answer) else None
    if record["answer_type"] in ("integer", "float"):
        numbers = _MV_NUMBER.findall(answer.replace(",", ""))
        return numbers[0] if len(numbers) == 1 else None
    return answer


def mathvista_extract(answer: str, record: Record) -> str | None:
    if answer == "":
        return None
    found = _mathvista_official(answer, record)
    return found if found is not None else _mathvista_added(answer, record)


def _mathvista_choice(extraction: str, choices: Sequence[str]) -> str:
    extraction = extraction.strip()
    bracketed = _MV_BRACKETED.findall(extraction)
    if bracketed:
        extraction = bracketed[0].upper()
    letters = list(string.ascii_uppercase[: len(choices)])
    if extraction in letters:
        return choices[letters.index(extraction)]
    return min(choices, key=lambda choice: levenshtein(extraction, choice))  # the first of equals, as MathVista


def mathvista_normalize(extraction: str, record: Record) -> str | None:
    """MathVista ``normalize_extracted_answer``; None where the answer type cannot be read."""
    if record["question_type"] == "multi_choice":
        return _mathvista_choice(extraction, record["choices"])
    try:
        if record["answer_type"] == "integer":
            return str(int(float(extraction)))
        if record["answer_type"] == "float":
            return str(round(float(extraction), int(record["precision"])))
    except (ValueError, OverflowError):
        return None
    return extraction


def _mathvista_fields(record: Record) -> None:
    kind = _choice(record, "question_type", ("multi_choice", "free_form"))
    answer_type = _choice(record, "answer_type", ("text", "integer", "float", "list"))
    _field(record, "label")
    if kind == "multi_choice":
        _list_options(record, "choices")
    if answer_type == "float" and kind == "free_form":
        _field(record, "precision", (int, float))


def _mathvista_record(record: Record) -> Result:
    _mathvista_fields(record)
    extraction = mathvista_extract(record["answer"], record)
    prediction = None if extraction is None else mathvista_normalize(extraction, record)
    right = prediction is not None and prediction == str(record["label"])
    return _result(record, right, pred=prediction, unparsed=prediction is None)


def _score_mathvista(records: list[Record]) -> dict:
    return _with_unparsed([_mathvista_record(record) for record in records])


# --------------------------------------------------------------------------------------------- ChartQA


def _chart_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_match(prediction: str, target: str, tolerance: float = 0.05) -> bool:
    """pix2struct's relaxed correctness: numbers within ``tolerance`` of a non-zero target, else exact text."""
    predicted, expected = _chart_float(prediction), _chart_float(target)
    if predicted is not None and expected:
        return abs(predicted - expected) / abs(expected) <= tolerance
    return prediction.lower() == target.lower()


def _score_chartqa(records: list[Record]) -> dict:
    results = [_result(r, any(relaxed_match(r["answer"], t) for t in _strings(r, "label"))) for r in records]
    return _plain(results, "relaxed_accuracy")


# ------------------------------------------------------------------------------------------ DocVQA ANLS


def _anls_distance(prediction: str, reference: str) -> float:
    a = " ".join(reference.strip().lower().split())
    b = " ".join(prediction.strip().lower().split())
    # The RRC evaluator divides by the raw lengths (of the upper-cased strings), not the normalised ones.
    length = max(len(reference.upper()), len(prediction.upper()))
    return levenshtein(a, b) / length if length else 0.0


def anls(prediction: str, references: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one answer: best over references, 0 below ``threshold``."""
    similarity = 1 - min(_anls_distance(prediction, r) for r in references)
    return similarity if similarity >= threshold else 0.0


def _score_anls(records: list[Record]) -> dict:
    results = [_result(r, anls(r["answer"], _strings(r, "answers"))) for r in records]
    return _plain(results, "anls")


# -------------------------------------------------------------------------------------------- OCRBench

OCRBENCH_CATEGORIES = (
    "Regular Text Recognition",
    "Irregular Text Recognition",
    "Artistic Text Recognition",
    "Handwriting Recognition",
    "Digit String Recognition",
    "Non-Semantic Text Recognition",
    "Scene Text-centric VQA",
    "Doc-oriented VQA",
    "Key Information Extraction",
    "Handwritten Mathematical Expression Recognition",
)
_HME = "Handwritten Mathematical Expression Recognition"


def _ocr_text(text: str, category: str) -> str:
    text = text.strip().replace("\n", " ")
    # Formulas are compared with every space removed and their case kept; other answers lowercased.
    return text.replace(" ", "") if category == _HME else text.lower()


def ocrbench_match(prediction: str, references: Sequence[str], category: str) -> bool:
    answer = _ocr_text(prediction, category)
    return any(_ocr_text(r, category) in answer for r in references)


def _score_ocrbench(records: list[Record]) -> dict:
    results, counts = [], defaultdict(int)
    for record in records:
        category = _choice(record, "category", OCRBENCH_CATEGORIES)
        right = ocrbench_match(record["answer"], _strings(record, "answers"), category)
        results.append(_result(record, right))
        counts[category] += right
    categories = {c: counts[c] for c in OCRBENCH_CATEGORIES if c in counts}
    return {"summary": {"score": sum(categories.values()), "categories": categories}, "results": results}


# ---------------------------------------------------------------------------------------------- entry

_SCORERS: dict[str, Callable[[list[Record]], dict]] = {
    "textvqa": _score_textvqa,
    "pope": _score_pope,
    "mme": _score_mme,
    "mmbench": _score_mmbench,
    "scienceqa": _score_scienceqa,
    "gqa": _score_gqa,
    "mmmu": _score_mmmu,
    "mathvista": _score_mathvista,
    "ai2d": _score_ai2d,
    "chartqa": _score_chartqa,
    "docvqa": _score_anls,
    "infovqa": _score_anls,
    "ocrbench": _score_ocrbench,
}


def score(task: str, records: Sequence[Record]) -> dict:
    """Score the model's answers to one benchmark.

    ``records``: the task's question records (fields in the module docstring), each with ``answer``, the model's
    raw output. Returns ``{"summary": {metric: value, ...}, "results": [{"question_id", "right", ...}, ...]}``
    with one result per record, in order. Unknown task, repeated question_id, or a missing or malformed field:
    ValueError.
    """
    if task not in _SCORERS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return _SCORERS[task](_prepare(records))
