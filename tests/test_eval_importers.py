"""``python -m mgjax.eval.importers``: a hand-made fixture of each LLaVA / MGM eval format (tests/fixtures/eval_imports,
tiny images drawn here) imported and then scored by ``python -m mgjax.eval --answers``: the ground truth as answers
scores 100%, a wrong answer set less; a broken input is an error naming the file, the line or entry and the reason,
and writes nothing. Also the request VLMEvalKit's ``GPT4V`` wrapper builds from docs/inference.md's config, through
the server's request checks (VLMEvalKit itself is not installed)."""

import base64
import io
import json
import re
import shlex
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mgjax.eval import harness, importers
from tests.helpers import help_text, undocumented

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "eval_imports"

# task -> (inputs, --images folder or None, image files drawn under the task's folder)
SOURCES = {
    "textvqa": (
        ["llava_textvqa_val_v051_ocr.jsonl", "TextVQA_0.5.1_val.json"],
        "train_images",
        ["train_images/003a8ae2ef43b901.jpg", "train_images/b9dc400eb20bad64.jpg", "train_images/0054c91397f2fe05.jpg"],
    ),
    "pope": (
        ["llava_pope_test.jsonl", "coco"],
        "val2014",
        ["val2014/COCO_val2014_000000310196.jpg", "val2014/COCO_val2014_000000210789.jpg"],
    ),
    "mme": (
        ["llava_mme.jsonl", "MME_Benchmark_release_version"],
        None,
        [
            "MME_Benchmark_release_version/artwork/images/10002.jpg",
            "MME_Benchmark_release_version/existence/000000006040.jpg",
            "MME_Benchmark_release_version/code_reasoning/0020.png",
        ],
    ),
    "gqa": (
        ["llava_gqa_testdev_balanced.jsonl", "testdev_balanced_questions.json"],
        "images",
        ["images/n288870.jpg", "images/n435808.jpg"],
    ),
    "scienceqa": (
        ["llava_test_CQM-A.json", "problems.json", "pid_splits.json"],
        "images/test",
        ["images/test/4/image.png", "images/test/11/image.png"],
    ),
    "mmbench": (["mmbench_dev_en.tsv"], None, []),
    "mathvista": (["testmini.json"], None, [f"images/{pid}.jpg" for pid in (5, 2, 41, 90)]),
    "llava-bench": (
        ["questions.jsonl", "answers_gpt4.jsonl", "context.jsonl"],
        "images",
        ["images/001.jpg", "images/002.jpg"],
    ),
}
SCORED = [task for task in SOURCES if task != "llava-bench"]


def _source(task: str, where: Path) -> Path:
    """A copy of the task's fixture with a small image drawn for every file its questions name."""
    src = where / task
    shutil.copytree(FIXTURES / task, src)
    rng = np.random.default_rng(0)
    for name in SOURCES[task][2]:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(src / name)
    return src


def _import(task: str, src: Path, out: Path, *extra: str) -> int:
    inputs, images, _ = SOURCES[task]
    argv = ["--task", task, "--out", str(out), *(str(src / name) for name in inputs), *extra]
    return importers.main(argv + (["--images", str(src / images)] if images else []))


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "questions.jsonl").read_text().splitlines()]


def _truth(task: str, record: dict) -> str:
    """An answer the task's reference scorer counts right."""
    if task == "textvqa":
        return Counter(record["answers"]).most_common(1)[0][0]
    if task == "scienceqa":
        return "ABCDE"[record["label"]]
    return str(record["label"])


def _score(task: str, out: Path, answers: dict, where: Path) -> dict:
    where.mkdir()
    file = where / "answers.jsonl"
    file.write_text("".join(json.dumps({"question_id": q, "answer": a}) + "\n" for q, a in answers.items()))
    assert harness.main(["--task", task, "--data", str(out), "--answers", str(file), "--out", str(where)]) == 0
    summary = json.loads((where / "results.json").read_text())["summary"]
    if task == "mme":  # each subtask's score out of its 200
        return {"accuracy": np.mean([c["score"] / 200 for c in summary["categories"].values()])}
    return summary


@pytest.mark.parametrize("task", SCORED)
def test_imported_fixture_scores_100_with_the_ground_truth(task, tmp_path, capsys):
    src, out = _source(task, tmp_path), tmp_path / "out"
    assert _import(task, src, out) == 0
    records = _records(out)
    printed = capsys.readouterr().out
    assert printed.startswith(f"{task}: {len(records)} questions -> {out / 'questions.jsonl'}\n")
    assert all((out / r["image"]).is_file() for r in records if "image" in r)
    right = _score(task, out, {r["question_id"]: _truth(task, r) for r in records}, tmp_path / "right")
    wrong = _score(task, out, {r["question_id"]: "zzz" for r in records}, tmp_path / "wrong")
    assert right["accuracy"] == 1.0
    assert wrong["accuracy"] < 1.0


def test_records_match_the_reference_scripts(tmp_path, capsys):
    """Ids, prompts and ground truth as LLaVA's and MGM's scripts build and match them; unasked ground truth is
    counted."""
    got = {}
    for task in SCORED:
        assert _import(task, _source(task, tmp_path), tmp_path / f"{task}-out") == 0
        got[task] = {r["question_id"]: r for r in _records(tmp_path / f"{task}-out")}
    printed = capsys.readouterr().out
    assert "not asked by llava_textvqa_val_v051_ocr.jsonl: 1 of the 5 questions in TextVQA_0.5.1_val.json" in printed
    assert "not asked by llava_mme.jsonl: 2 of the 8 questions in the answer files of artwork, existence" in printed
    assert "not asked by llava_gqa_testdev_balanced.jsonl: 1 of the 5 questions in testdev_balanced_q" in printed
    assert "5 rows are 2 questions with their circular copies" in printed
    assert "3 images written under" in printed  # MMBench: two decoded, one copy's own image; the others share
    # TextVQA: LLaVA's question_id is the image id; the annotation's own id is kept
    assert list(got["textvqa"]) == [34602, 34603, 34604, 34605]
    assert got["textvqa"][34603]["answers"][4] == "grey"
    # POPE: labels paired per category, in order (LLaVA's "imange" against POPE's later "image" tolerated)
    assert {q: r["label"] for q, r in got["pope"].items()} == {
        10000001: "yes",
        30000001: "yes",
        10000002: "no",
        30000002: "no",
        10000003: "yes",
        10000004: "no",
    }
    # MME: both questions of an image, the double-space answer line found, the category from the id
    assert got["mme"]["artwork/10002.jpg#1"]["label"] == "no" and got["mme"]["existence/000000006040.jpg#1"]
    assert got["mme"]["code_reasoning/0020.png#0"]["category"] == "code_reasoning"
    assert got["gqa"]["201640614"]["label"] == "woman"
    sqa = got["scienceqa"]
    assert sqa["4"]["text"] == (
        "Context: Select the best answer.\nWhich property do these three objects have in common?\nA. shiny\n"
        "B. slippery\nC. opaque\nAnswer with the option's letter from the given choices directly."
    )
    assert sqa["4"]["label"] == 2 and "image" not in sqa["5"] and sqa["11"]["image"].endswith("11/image.png")
    mmb = got["mmbench"]
    assert mmb[0]["text"] == (
        "The picture shows one square.\nWhat is the color of the square?\nA. red\nB. blue\nC. green\nD. yellow\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert mmb[1]["options"] == {"A": "A dog", "B": "A square"} and mmb[1]["text"].startswith("Which is the main")
    assert [mmb[i]["index"] for i in (0, 1, 1000000, 1000001, 2000000)] == [0, 1, 0, 1, 0]
    assert mmb[1000000]["image"] == mmb[0]["image"] == "images/0.png" and mmb[2000000]["image"] == "images/2000000.png"
    assert Image.open(tmp_path / "mmbench-out" / "images" / "0.png").size == (2, 2)
    mv = got["mathvista"]
    assert mv["2"]["text"] == (
        "Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, "
        "at the end.\nQuestion: what is the total volume of the measuring cup? (Unit: g)"
    )
    assert mv["5"]["text"].endswith("Question: Find $m\\angle H$\nChoices:\n(A) 97\n(B) 102\n(C) 107\n(D) 122")
    assert mv["41"]["text"].startswith("Hint: Please answer the question requiring a floating-point number with two")


def test_mmbench_cn_prompt(tmp_path):
    assert _import("mmbench", _source("mmbench", tmp_path), tmp_path / "out", "--lang", "cn") == 0
    assert _records(tmp_path / "out")[0]["text"].endswith("D. yellow\n请直接回答选项字母。")


def test_llava_bench_is_imported_for_generation_only(tmp_path, capsys):
    assert _import("llava-bench", _source("llava-bench", tmp_path), tmp_path / "out") == 0
    records = _records(tmp_path / "out")
    assert [r["category"] for r in records] == ["conv", "detail", "complex"]
    assert records[2]["reference"].startswith("The painting may be") and records[2]["caption"].startswith("A dog")
    assert "generation only" in capsys.readouterr().out


def test_copied_images_make_a_self_contained_folder(tmp_path):
    src, out = _source("gqa", tmp_path), tmp_path / "out"
    assert _import("gqa", src, out, "--copy-images") == 0
    shutil.rmtree(src / "images")
    images = {r["image"] for r in _records(out)}
    assert images == {"images/n288870.jpg", "images/n435808.jpg"}
    assert all((out / name).is_file() for name in images)


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def _drop_line(path: Path, containing: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(line for line in lines if containing not in line))


def _swap_lines(path: Path, a: int, b: int) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[a - 1], lines[b - 1] = lines[b - 1], lines[a - 1]
    path.write_text("".join(lines))


# (task, breakage of the copied fixture, what the error says)
BROKEN = {
    "textvqa-missing-field": (
        "textvqa",
        lambda s: _edit(s / "llava_textvqa_val_v051_ocr.jsonl", '"text": "what color', '"txt": "what color'),
        "llava_textvqa_val_v051_ocr.jsonl:2: missing field 'text'",
    ),
    "textvqa-not-json": (
        "textvqa",
        lambda s: _edit(s / "llava_textvqa_val_v051_ocr.jsonl", '{"question_id": "b9dc', '{"question_id: "b9dc'),
        "llava_textvqa_val_v051_ocr.jsonl:3: not JSON",
    ),
    "textvqa-no-answer": (
        "textvqa",
        lambda s: _drop_line(s / "TextVQA_0.5.1_val.json", '"question_id": 34605'),
        "llava_textvqa_val_v051_ocr.jsonl:4: TextVQA_0.5.1_val.json has no (more) answers for image '0054c91397f2fe05',"
        " question 'what number is on the jersey?'",
    ),
    "pope-missing-image": (
        "pope",
        lambda s: (s / "val2014" / "COCO_val2014_000000210789.jpg").unlink(),
        "llava_pope_test.jsonl:5: image 'COCO_val2014_000000210789.jpg' does not exist in",
    ),
    "pope-out-of-order": (
        "pope",
        lambda s: _swap_lines(s / "coco" / "coco_pope_adversarial.json", 1, 2),
        "coco_pope_adversarial.json:1: labels 'Is there a backpack in the image?' on "
        "'COCO_val2014_000000310196.jpg', but the question it pairs with (llava_pope_test.jsonl:1) asks "
        "'Is there a snowboard in the image?'",
    ),
    "pope-too-few-labels": (
        "pope",
        lambda s: _drop_line(s / "coco" / "coco_pope_random.json", "giraffe"),
        "coco_pope_random.json: 1 labels for the 2 questions of category 'random' in llava_pope_test.jsonl: LLaVA's "
        "eval_pope pairs them in order (LLaVA-1.5's llava_pope_test.jsonl was built from POPE commit e3e39262",
    ),
    "pope-no-label-file": (
        "pope",
        lambda s: (s / "coco" / "coco_pope_random.json").unlink(),
        "llava_pope_test.jsonl:2: category 'random' has no label file coco_pope_random.json",
    ),
    "mme-no-answer": (
        "mme",
        lambda s: _drop_line(s / "MME_Benchmark_release_version/artwork/questions_answers_YN/10002.txt", "Vermeer"),
        "llava_mme.jsonl:2: artwork/.../10002.txt has no answer for the question "
        "'Is this artwork created by Vermeer? Please answer yes or no.'",
    ),
    "mme-bad-answer-line": (
        "mme",
        lambda s: _edit(s / "MME_Benchmark_release_version/code_reasoning/0020.txt", ".\tNo", ". No"),
        "0020.txt:2: not 'question<TAB>answer'",
    ),
    "gqa-no-answer": (
        "gqa",
        lambda s: _drop_line(s / "testdev_balanced_questions.json", '"201640614"'),
        "llava_gqa_testdev_balanced.jsonl:4: question 201640614 is not in testdev_balanced_questions.json",
    ),
    "scienceqa-unasked-problem": (
        "scienceqa",
        lambda s: _edit(s / "pid_splits.json", '"test": ["4", "5", "11"]', '"test": ["4", "5", "11", "12"]'),
        "llava_test_CQM-A.json: 1 problems of the 'test' split (first: 12) have no question here",
    ),
    "scienceqa-missing-image": (
        "scienceqa",
        lambda s: (s / "images/test/4/image.png").unlink(),
        "llava_test_CQM-A.json: item 0 (id '4'): image '4/image.png' does not exist in",
    ),
    "scienceqa-bad-answer": (
        "scienceqa",
        lambda s: _edit(s / "problems.json", '"answer": 0,', '"answer": 3,'),
        "problems.json: entry '11': answer 3 names no choice",
    ),
    "mmbench-answer-names-no-option": (
        "mmbench",
        lambda s: _edit(s / "mmbench_dev_en.tsv", "\tnan\tnan\tB\t", "\tnan\tnan\tE\t"),
        "mmbench_dev_en.tsv:3: answer 'E' names no option (options A, B)",
    ),
    "mmbench-test-split": (
        "mmbench",
        lambda s: _edit(s / "mmbench_dev_en.tsv", "\tanswer\t", "\tanswers\t"),
        "mmbench_dev_en.tsv:1: no column 'answer': a test split has no ground truth",
    ),
    "mmbench-bad-image": (
        "mmbench",
        lambda s: _edit(s / "mmbench_dev_en.tsv", "color_recognition\tiVBOR", "color_recognition\t!VBOR"),
        "mmbench_dev_en.tsv:2: column 'image' is not base64",
    ),
    "mathvista-no-answer": (
        "mathvista",
        lambda s: _edit(s / "testmini.json", '"answer": "1.45"', '"answer": ""'),
        "testmini.json: entry '41': no answer",
    ),
    "llava-bench-no-reference": (
        "llava-bench",
        lambda s: _drop_line(s / "answers_gpt4.jsonl", '"question_id": 2'),
        "questions.jsonl:3: question 2 has no reference answer in answers_gpt4.jsonl",
    ),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_input_names_file_line_and_reason_and_writes_nothing(case, tmp_path, capsys):
    task, breakage, message = BROKEN[case]
    src, out = _source(task, tmp_path), tmp_path / "out"
    breakage(src)
    assert _import(task, src, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not out.exists()


def test_wrong_inputs_are_usage_errors(tmp_path, capsys):
    src = _source("gqa", tmp_path)
    inputs = [str(src / name) for name in SOURCES["gqa"][0]]
    assert importers.main(["--task", "gqa", "--out", str(tmp_path / "o"), *inputs]) == 2
    assert "--images: gqa's questions name image files; pass their folder" in capsys.readouterr().err
    assert importers.main(["--task", "gqa", "--out", str(tmp_path / "o"), inputs[0], "--images", str(src)]) == 2
    err = capsys.readouterr().err
    assert "gqa reads llava_gqa_testdev_balanced.jsonl testdev_balanced_questions.json; got 1 input(s)" in err
    typo = [inputs[0], str(src / "typo.json"), "--images", str(src)]
    assert importers.main(["--task", "gqa", "--out", str(tmp_path / "o"), *typo]) == 2
    assert f"{src / 'typo.json'}: no such file" in capsys.readouterr().err


def test_help_lists_every_task_and_its_inputs(capsys):
    assert undocumented(importers.parser()) == []
    text = help_text(importers.main, [], capsys)
    for task, imp in importers.IMPORTERS.items():
        assert f"{task} {' '.join(imp.inputs)}" in text
    assert "(default: test)" in text and "(default: None)" not in text


# ------------------------------------------------------------------------------------------- VLMEvalKit

# Substrings of a model name that make VLMEvalKit's OpenAIWrapper change its request (vlmeval/api/gpt.py).
VLMEVAL_NAME_SWITCHES = ("o1", "o3", "o4", "gpt-5", "step", "yi-vision", "internvl2-pro", "abab", "moonshot", "grok")
VLMEVAL_NAME_SWITCHES += ("gemini", "ernie")


def _vlmevalkit_section() -> tuple[dict, list[str]]:
    """The GPT4V config and the ``mgjax.serve`` command of docs/inference.md's VLMEvalKit section."""
    doc = (ROOT / "docs" / "inference.md").read_text()
    section = doc[doc.index("### VLMEvalKit against `mgjax.serve`") :]
    blocks = re.findall(r"```text\n(.*?)```", section, re.DOTALL)
    config = json.loads(next(b for b in blocks if '"class": "GPT4V"' in b))
    serve_line = next(line for b in blocks for line in b.splitlines() if line.startswith("python -m mgjax.serve"))
    return config, shlex.split(serve_line.rstrip("&"))[3:]


def test_vlmevalkit_gpt4v_requests_are_served():
    """The request ``OpenAIWrapper.generate_inner`` builds from the documented config (one user message: the image
    as a JPEG data URI with ``detail``, then the dataset's prompt; ``temperature``, ``max_tokens``; ``n`` dropped for
    a non-OpenAI ``api_base``) passes the server's checks, with ``<image>`` before the question."""
    from mgjax.inference import serve

    config, serve_args = _vlmevalkit_section()
    (model,) = config["model"].values()
    args = serve.parser().parse_args(serve_args)
    assert model["class"] == "GPT4V" and model["model"] == args.name
    assert model["api_base"] == f"http://127.0.0.1:{args.port}/v1/chat/completions"
    assert not any(switch in model["model"] for switch in VLMEVAL_NAME_SWITCHES)
    assert model["max_tokens"] <= args.max_tokens_limit and 2048 <= args.max_tokens_limit  # GPT4V's default: 2048
    assert all(spec.get("class") for spec in config["data"].values())

    jpeg = io.BytesIO()
    Image.new("RGB", (120, 100), (200, 30, 30)).save(jpeg, format="JPEG")
    prompt = "Question: What color?\nOptions:\nA. red\nB. blue\n"
    prompt += "Please select the correct answer from the options above. \n"  # ImageMCQDataset.build_prompt
    image = {"url": "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode(), "detail": "high"}
    content = [{"type": "image_url", "image_url": image}, {"type": "text", "text": prompt}]
    body = {"model": model["model"], "messages": [{"role": "user", "content": content}]}
    body.update(temperature=model["temperature"], max_tokens=model["max_tokens"])
    turns, images = serve.conversation(body["messages"])
    assert turns == [{"from": "human", "value": "<image>\n" + prompt}]
    assert [im.size for im in images] == [(120, 100)]
    sampling, budget, stops = serve.settings(body, args.max_tokens_limit, args.max_tokens)
    assert (sampling.temperature, budget, stops) == (0.0, model["max_tokens"], [])
    # a text-only question is one text part; newer releases' --base-url default budget (32768) is refused
    assert serve.conversation([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])[0][0]["value"] == "hi"
    with pytest.raises(serve.RequestError, match="max_tokens"):
        serve.settings({**body, "max_tokens": 2**15}, args.max_tokens_limit, args.max_tokens)


def test_llava_bench_is_answered_in_llavas_format_for_its_review(internvl_dir, tmp_path, capsys):
    """Imported, answered by ``mgjax.eval`` (no offline score exists: a GPT-4 review scores it), and written as
    LLaVA's ``model_vqa`` answer file, one line per question in order."""
    _, model = internvl_dir
    out = tmp_path / "questions"
    assert _import("llava-bench", _source("llava-bench", tmp_path), out) == 0
    run = tmp_path / "run"
    argv = ["--task", "llava-bench", "--data", out, "--model", model, "--out", run, "--max-new-tokens", "3"]
    assert harness.main([str(a) for a in argv]) == 0
    assert "GPT-4 review" in capsys.readouterr().out
    lines = [json.loads(x) for x in (run / "answers_llava.jsonl").read_text().splitlines()]
    assert [x["question_id"] for x in lines] == [r["question_id"] for r in _records(out)]
    assert all(set(x) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} for x in lines)
    assert json.loads((run / "results.json").read_text())["summary"]["answered"] == 3
