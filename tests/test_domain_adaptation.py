"""``python -m mgjax.train`` on Mini-InternVL's domain adaptation, with the tiny InternVL2 demo (configs/internvl/
demo_general.yaml, then demo.yaml from its output): each mode trains what it says and nothing else, keeps
optimizer state for exactly its trainable set, exports plain HF weights (LoRA merged), and scores greedy answers
on held-out grounding data."""

import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import mgjax
from mgjax.nn.params import count_params
from mgjax.train import cli

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "internvl"
MODES = ("full", "frozen_vit", "lora")


def _train(config: str, out: Path, *sets: str, steps: int = 4, batch: int = 8) -> int:
    return cli.main(
        [
            "--config",
            str(CONFIGS / config),
            "--set",
            f"train.out_dir={out}",
            "--set",
            f"train.steps={steps}",
            "--set",
            f"train.global_batch={batch}",
            "--set",
            "train.progress=false",
            "--set",
            "eval.max_new_tokens=8",
            *[a for s in sets for a in ("--set", s)],
        ]
    )


def _adapt(general: Path, out: Path, *sets: str, **kw) -> int:
    """demo.yaml from the general model in ``general``."""
    return _train(
        "demo.yaml",
        out,
        f"model.path={general / 'final'}",
        f"data.meta={general / 'data' / 'domain_meta.json'}",
        f"data.general_meta={general / 'data' / 'general_meta.json'}",
        f"eval.path={general / 'data' / 'eval.jsonl'}",
        *sets,
        **kw,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    assert _train("demo_general.yaml", root / "general") == 0
    for mode in MODES:
        assert _adapt(root / "general", root / mode, f"train.stage={mode}", "eval.at_start=false") == 0
    return root


def _params(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _load(path: Path):
    return mgjax.from_pretrained(path, image_token_id=_token(path))  # strict: no adapter keys may be left


def _token(path: Path) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).convert_tokens_to_ids("<IMG_CONTEXT>")


def _changed(runs, mode) -> dict[str, bool]:
    before, after = _params(_load(runs / "general" / "final")), _params(_load(runs / mode / "final"))
    assert after.keys() == before.keys()
    return {k: not np.array_equal(after[k], before[k]) for k in before}


def test_full_trains_everything(runs):
    changed = _changed(runs, "full")
    for part in ("vision_tower.", "multi_modal_projector.", "language_model."):
        assert any(v for k, v in changed.items() if k.startswith(part)), part


def test_frozen_vit_leaves_the_vit_bit_identical(runs):
    changed = _changed(runs, "frozen_vit")
    assert not any(v for k, v in changed.items() if k.startswith("vision_tower."))
    assert any(v for k, v in changed.items() if k.startswith("multi_modal_projector."))
    assert any(v for k, v in changed.items() if k.startswith("language_model."))


def test_lora_changes_only_the_llm_linears_it_adapts(runs):
    changed = _changed(runs, "lora")
    moved = {k for k, v in changed.items() if v}
    assert moved, "the merged adapters changed nothing"
    assert all(
        k.startswith("language_model.model.layers.") and (".self_attn." in k or ".mlp." in k) and k.endswith(".weight")
        for k in moved
    ), sorted(moved)


def test_optimizer_state_covers_the_trainable_set_only(runs):
    mem = {m: json.loads((runs / m / "memory.json").read_text()) for m in MODES}
    model = _load(runs / "general" / "final")
    vit = count_params(model.vision_tower)
    total = count_params(model)
    adam = 2 * 4  # two float32 moments per trainable value, and a few bytes of step counts
    assert 0 <= mem["full"]["optimizer_bytes"] - adam * total < 64
    assert 0 <= mem["frozen_vit"]["optimizer_bytes"] - adam * (total - vit) < 64
    assert mem["lora"]["optimizer_bytes"] < mem["frozen_vit"]["optimizer_bytes"] / 4
    peak = {m: mem[m]["compiled_step_per_device"]["peak"] for m in MODES}
    assert peak["frozen_vit"] < peak["full"] and peak["lora"] < peak["full"], peak


def test_held_out_grounding_is_scored_on_generated_answers(runs):
    score = json.loads((runs / "lora" / "eval.json").read_text())
    assert score["grounding"]["total"] == 100 and score["grounding"]["skipped"] == 0
    answers = [json.loads(line) for line in (runs / "lora" / "eval_answers.jsonl").read_text().splitlines()]
    assert len(answers) == 100 and {a["kind"] for a in answers} == {"grounding"}
    assert all(a["reference"].startswith("<ref>the ") and "<box>[[" in a["reference"] for a in answers)


@pytest.mark.parametrize(
    "sets, message",
    [
        (["train.stage=stage2"], "train.stage must be one of ['frozen_vit', 'full', 'lora'] for model.family internvl"),
        (["data.meta=/nonexistent/meta.json"], "/nonexistent/meta.json"),
        (["eval.compare_lr_only=true"], "model.family mgm"),
    ],
)
def test_bad_settings_are_refused(tmp_path, capsys, sets, message):
    assert _train("demo_general.yaml", tmp_path / "run", *sets) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_domain_grounding_accuracy_rises_in_every_mode(tmp_path):
    """The demo as configured (general model 400 steps, each mode 200): the held-out domain grounding accuracy
    rises above the general model's."""
    assert _train("demo_general.yaml", tmp_path / "general", "eval.max_new_tokens=40", steps=400, batch=32) == 0
    for mode in MODES:
        assert (
            _adapt(
                tmp_path / "general",
                tmp_path / mode,
                f"train.stage={mode}",
                "eval.max_new_tokens=40",
                steps=200,
                batch=32,
            )
            == 0
        )
        score = json.loads((tmp_path / mode / "eval.json").read_text())
        assert score["end"]["grounding"]["accuracy"] > score["start"]["grounding"]["accuracy"], (mode, score)


def test_packed_rows_train(tmp_path, capsys):
    """data.pack_length: samples packed into rows (segment ids to the model and the loss), square weighting."""
    assert (
        _train(
            "demo_general.yaml",
            tmp_path / "packed",
            "data.pack_length=256",
            "train.global_batch=2",
            "train.loss_weighting=square",
            "eval.enabled=false",
            steps=3,
        )
        == 0
    )
    steps = [json.loads(line) for line in (tmp_path / "packed" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 3 and all(np.isfinite(s["loss"]) for s in steps)
    assert _train("demo_general.yaml", tmp_path / "nosteps", "data.pack_length=256", "train.steps=0") == 2
    assert "set train.steps" in capsys.readouterr().err
