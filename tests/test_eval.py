"""``python -m mgjax.eval``: every task's fixture scored through the command line, a tiny InternVL2 answering a
fixture (batched answers equal one-by-one answers, an interrupted run resumes), and clear errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mgjax.eval import harness as evaluate
from mgjax.eval import scoring
from tests.helpers import help_text, undocumented

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "eval"


def _with_images(task: str, where: Path) -> Path:
    """A copy of the task's fixture with a small random image for every name it references."""
    data = where / task
    shutil.copytree(FIXTURES / task, data)
    rng = np.random.default_rng(0)
    for record in evaluate.read_jsonl(data / "questions.jsonl"):
        if record.get("image") and not (data / record["image"]).exists():
            Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(data / record["image"])
    return data


@pytest.mark.parametrize("task", scoring.TASKS)
def test_fixture_answers_score_through_the_command_line(task, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        evaluate.main(
            [
                "--task",
                task,
                "--data",
                str(FIXTURES / task),
                "--answers",
                str(FIXTURES / task / "answers.jsonl"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads((out / "results.json").read_text())
    answers = {r["question_id"]: r["answer"] for r in evaluate.read_jsonl(FIXTURES / task / "answers.jsonl")}
    records = [
        {**r, "answer": answers[r["question_id"]]} for r in evaluate.read_jsonl(FIXTURES / task / "questions.jsonl")
    ]
    assert result == json.loads(json.dumps(scoring.score(task, records)))
    assert capsys.readouterr().out.startswith(f"{task}:\n")


def test_a_model_answers_batched_as_one_by_one_and_resumes(internvl_dir, tmp_path, capsys):
    _, model = internvl_dir
    data = _with_images("pope", tmp_path)

    def run(out, batch):
        args = ["--task", "pope", "--data", data, "--model", model, "--out", out, "--batch", batch]
        return evaluate.main([*map(str, args), "--max-new-tokens", "3"])

    assert run(tmp_path / "b4", 4) == 0
    assert run(tmp_path / "b1", 1) == 0
    four = (tmp_path / "b4" / "answers.jsonl").read_text()
    assert four == (tmp_path / "b1" / "answers.jsonl").read_text() and len(four.splitlines()) == 8
    assert "8 to answer" in capsys.readouterr().out
    lines = four.splitlines()
    (tmp_path / "b4" / "answers.jsonl").write_text("\n".join(lines[:5]) + "\n")  # as if interrupted
    assert run(tmp_path / "b4", 4) == 0
    assert "5 answered before, 3 to answer" in capsys.readouterr().out
    assert (tmp_path / "b4" / "answers.jsonl").read_text() == four
    summary = json.loads((tmp_path / "b4" / "results.json").read_text())["summary"]
    assert set(summary) >= {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    # the model options every command shares: a quantized model answers the same benchmark
    args = ["--task", "pope", "--data", data, "--model", model, "--out", tmp_path / "int8", "--quant", "int8"]
    assert evaluate.main([*map(str, args), "--max-new-tokens", "3"]) == 0
    assert len((tmp_path / "int8" / "answers.jsonl").read_text().splitlines()) == 8


def test_errors_name_the_question_or_file(internvl_dir, tmp_path, capsys):
    _, model = internvl_dir
    data = _with_images("gqa", tmp_path)
    (data / "answers.jsonl").write_text('{"question_id": "g1", "answer": "yes"}\n')
    assert (
        evaluate.main(
            [
                "--task",
                "gqa",
                "--data",
                str(data),
                "--answers",
                str(data / "answers.jsonl"),
                "--out",
                str(tmp_path / "o1"),
            ]
        )
        == 2
    )
    assert "no answer for question_id" in capsys.readouterr().err
    image = evaluate.read_jsonl(data / "questions.jsonl")[0]["image"]
    (data / image).unlink()
    assert (
        evaluate.main(
            [
                "--task",
                "gqa",
                "--data",
                str(data),
                "--model",
                str(model),
                "--out",
                str(tmp_path / "o2"),
                "--max-new-tokens",
                "2",
            ]
        )
        == 2
    )
    assert image in capsys.readouterr().err
    args = ["--task", "gqa", "--data", str(data), "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o3")]
    assert evaluate.main(args) == 2
    assert capsys.readouterr().err == f"error: --model {tmp_path / 'nowhere'}: no such directory\n"
    args = ["--task", "gqa", "--data", str(tmp_path), "--answers", str(data / "answers.jsonl")]
    assert evaluate.main(args) == 2
    assert capsys.readouterr().err == f"error: --data: no file {tmp_path / 'questions.jsonl'}\n"
    assert evaluate.main(["--task", "gqa", "--data", str(data), "--answers", str(data / "typo.jsonl")]) == 2
    assert capsys.readouterr().err == f"error: --answers: no file {data / 'typo.jsonl'}\n"


def test_help_explains_every_flag_and_shows_defaults(capsys):
    assert undocumented(evaluate.parser()) == []
    text = help_text(evaluate.main, [], capsys)
    assert "answers are saved after each batch (default: 8)" in text and "(default: runs/eval/TASK)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
