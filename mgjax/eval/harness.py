"""``python -m mgjax.eval --task NAME --data DIR --model DIR``: a benchmark of either paper, answered by a model and
scored by the benchmark's own rules (``mgjax.eval.scoring``).

``DIR/questions.jsonl`` holds one question per line, LLaVA-style: ``question_id``, ``text`` (the prompt as the
benchmark words it), ``image`` (a file under DIR; optional) and the task's ground-truth fields (see
``mgjax.eval.scoring``). Answers are appended to ``OUT/answers.jsonl`` as they are generated, so an interrupted run
resumes where it stopped; then ``OUT/results.json`` gets the summary and the per-question results, and the
summary is printed. ``--answers FILE`` scores existing answers without a model. ``--task llava-bench`` (imported by
``mgjax.eval.importers``) has no offline score: its answers are written in LLaVA's format for a GPT-4 review
(``OUT/answers_llava.jsonl``). Data are the user's: nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from mgjax.cli import HelpFormatter, compilation_cache, integer, number
from mgjax.data import preprocess, samples, templates
from mgjax.eval import scoring
from mgjax.inference import decoding
from mgjax.inference.generate import (
    TEMPLATE_HELP,
    add_model_arguments,
    batch_embeds,
    conversation_inputs,
    default_template,
    load_model,
    stop_ids,
)

# Answer budgets of the papers' scripts: MGM's 128 for short answers and 1024 for reasoning (MathVista; MMBench's
# 1024 is cut to 64: a letter is asked for), InternVL's 100 for documents and charts.
MAX_NEW_TOKENS = {
    "textvqa": 128,
    "pope": 128,
    "mme": 128,
    "gqa": 128,
    "scienceqa": 128,
    "mmbench": 64,
    "ai2d": 64,
    "mmmu": 128,
    "mathvista": 1024,
    "chartqa": 100,
    "docvqa": 100,
    "infovqa": 100,
    "ocrbench": 100,
    "llava-bench": 1024,
}
# benchmarks answered here and scored elsewhere: LLaVA-Bench (in-the-wild) by a GPT-4 review of each answer
REVIEWED = ("llava-bench",)
BUCKET = 64  # prompts padded to a multiple of this: a handful of compiled shapes for a whole benchmark
# MGM scores MMMU with beam-sample (5 beams, temperature 1, seed 42); every other task is greedy.
SAMPLING = {"mmmu": decoding.Sampling(num_beams=5, temperature=1.0, seed=42)}


def read_jsonl(path: Path) -> list[dict]:
    records = []
    for record in samples.read_records(path):
        if isinstance(record, samples.BadSample):
            raise ValueError(str(record))
        records.append(record)
    return records


def _inputs(model, tokenizer, template: str | None, record: dict, data: Path, exif_transpose: bool):
    """(prompt ids [T], image arguments) of one question."""
    image = record.get("image")
    images = [preprocess.load_image(data / image, exif_transpose=exif_transpose)] if image else []
    text = str(record.get("text", ""))
    if image and templates.IMAGE not in text:
        text = templates.IMAGE + "\n" + text
    ids, args = conversation_inputs(model, tokenizer, template, [{"from": "human", "value": text}], images)
    return ids[0], args


def answer(
    model,
    tokenizer,
    template: str | None,
    records: list[dict],
    data: Path,
    *,
    max_new_tokens: int,
    sampling: decoding.Sampling,
    batch: int,
    exif_transpose: bool = False,
) -> list[str]:
    """The model's answers to ``records``, decoded ``batch`` at a time (left-padded; questions with and without an
    image in separate batches)."""
    stops = stop_ids(tokenizer, template)
    lm = getattr(model, "language_model", model)
    prepared = [_inputs(model, tokenizer, template, r, data, exif_transpose) for r in records]
    out: list[str] = [""] * len(records)
    for has_image in (True, False):
        order = [i for i, (_, args) in enumerate(prepared) if bool(args) == has_image]
        for lo in range(0, len(order), batch):
            chunk = order[lo : lo + batch]
            ids, mask = decoding.left_pad([prepared[i][0] for i in chunk], tokenizer.pad_token_id or 0, bucket=BUCKET)
            ids, mask = jnp.asarray(ids), jnp.asarray(mask)
            embeds = batch_embeds(model, ids, [prepared[i][1] for i in chunk])
            if sampling.num_beams > 1:
                new = decoding.beam_search(
                    lm,
                    ids,
                    max_new_tokens,
                    sampling=sampling,
                    attention_mask=mask,
                    inputs_embeds=embeds,
                    stop_ids=stops,
                )
            else:
                full = decoding.generate(
                    lm,
                    ids,
                    max_new_tokens,
                    attention_mask=mask,
                    inputs_embeds=embeds,
                    sampling=sampling,
                    stop_ids=stops,
                )
                new = np.asarray(full)[:, ids.shape[1] :].tolist()
            for i, tokens in zip(chunk, new):
                out[i] = tokenizer.decode(decoding.cut(tokens, stops), skip_special_tokens=True)
    return out


def _done(path: Path) -> dict[Any, str]:
    return {r["question_id"]: r["answer"] for r in read_jsonl(path)} if path.exists() else {}


def _print_summary(task: str, summary: dict) -> None:
    print(f"{task}:")
    for key, value in summary.items():
        if isinstance(value, dict):
            for name, sub in value.items():
                print(f"  {key}/{name}: {json.dumps(sub)}")
        else:
            print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m mgjax.eval",
        description=__doc__.split("\n\n")[0],
        epilog=f"tasks: {', '.join(scoring.TASKS)}; answered only (a GPT-4 review scores them): {', '.join(REVIEWED)}",
        formatter_class=HelpFormatter,
    )
    ap.add_argument(
        "--task",
        required=True,
        choices=(*scoring.TASKS, *REVIEWED),
        help="the benchmark whose rules score the answers (llava-bench: answered, in LLaVA's format for its review)",
    )
    ap.add_argument("--data", required=True, help="a folder with questions.jsonl and its images")
    ap.add_argument("--model", help="a converted checkpoint directory (with tokenizer files) that answers")
    ap.add_argument("--answers", help="score this answers JSONL ({question_id, answer}) instead of running a model")
    ap.add_argument("--out", help="output folder for answers.jsonl and results.json (default: runs/eval/TASK)")
    ap.add_argument("--template", help=TEMPLATE_HELP)
    ap.add_argument(
        "--batch", type=integer(1), default=8, help="questions decoded together; answers are saved after each batch"
    )
    ap.add_argument(
        "--max-new-tokens",
        type=integer(1),
        help="each answer's budget, in tokens (default: the task's, as its paper set it)",
    )
    ap.add_argument(
        "--num-beams", type=integer(1), help="beam search with N beams (default: the task's; MMMU: 5, sampled)"
    )
    ap.add_argument("--temperature", type=number(0), help="sampling temperature; 0: greedy (default: the task's)")
    add_model_arguments(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    compilation_cache()
    data, out = Path(args.data), Path(args.out or f"runs/eval/{args.task}")
    try:
        records = read_jsonl(_named(data / "questions.jsonl", "--data"))
        if args.answers:
            answers = _done(_named(Path(args.answers), "--answers"))
        elif args.model:
            answers = _run(args, records, data, out)
        else:
            raise ValueError("pass --model (to answer the questions) or --answers (to score answers)")
        missing = [r["question_id"] for r in records if r["question_id"] not in answers]
        if missing:
            raise ValueError(f"no answer for question_id {missing[:5]} ({len(missing)} in all)")
        if args.task in REVIEWED:
            result = _for_review(records, answers, out, Path(args.model or args.answers).name)
        else:
            result = scoring.score(args.task, [{**r, "answer": answers[r["question_id"]]} for r in records])
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_summary(args.task, result["summary"])
    return 0


def _for_review(records: list[dict], answers: dict, out: Path, model_id: str) -> dict:
    """A benchmark no rule scores (LLaVA-Bench: GPT-4 reviews each answer against its reference): the answers in
    LLaVA's ``model_vqa`` format (``OUT/answers_llava.jsonl``, what ``llava/eval/eval_gpt_review_bench.py`` reads
    with the benchmark's questions, context and GPT-4 answers), and a summary without a score."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "answers_llava.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            line = {"question_id": r["question_id"], "prompt": r.get("text", ""), "text": answers[r["question_id"]]}
            line.update(answer_id=f"mgjax-{r['question_id']}", model_id=model_id, metadata={})
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    words = [len(answers[r["question_id"]].split()) for r in records]
    print(f"scored by a GPT-4 review, not here: {out / 'answers_llava.jsonl'} is LLaVA's answer file for it")
    return {
        "summary": {"answered": len(records), "mean_words": sum(words) / max(len(words), 1)},
        "results": [{"question_id": r["question_id"], "answer": answers[r["question_id"]]} for r in records],
    }


def _named(path: Path, flag: str) -> Path:
    """``path``, which ``flag`` names or holds, checked so that a typo's error names the flag (and an absent
    answers file is not taken for an empty one)."""
    if not path.is_file():
        raise ValueError(f"{flag}: no file {path}")
    return path


def _run(args, records: list[dict], data: Path, out: Path) -> dict[Any, str]:
    """Answers to every record, those of an earlier run of ``out`` reused; new ones appended as each batch ends."""
    out.mkdir(parents=True, exist_ok=True)
    done = _done(out / "answers.jsonl")
    todo = [r for r in records if r["question_id"] not in done]
    print(f"{args.task}: {len(records)} questions, {len(done)} answered before, {len(todo)} to answer")
    if not todo:
        return done
    model, tokenizer = load_model(args)
    template = args.template or default_template(model, tokenizer)
    s = SAMPLING.get(args.task, decoding.Sampling())
    sampling = decoding.Sampling(
        num_beams=args.num_beams or s.num_beams,
        seed=s.seed,
        temperature=s.temperature if args.temperature is None else args.temperature,
    )
    budget = args.max_new_tokens or MAX_NEW_TOKENS[args.task]
    with open(out / "answers.jsonl", "a", encoding="utf-8") as f:
        for lo in range(0, len(todo), args.batch):
            chunk = todo[lo : lo + args.batch]
            texts = answer(
                model,
                tokenizer,
                template,
                chunk,
                data,
                max_new_tokens=budget,
                sampling=sampling,
                batch=args.batch,
                exif_transpose=args.exif_transpose,
            )
            for record, text in zip(chunk, texts):
                f.write(json.dumps({"question_id": record["question_id"], "answer": text}, ensure_ascii=False) + "\n")
                done[record["question_id"]] = text
            f.flush()
    return done
