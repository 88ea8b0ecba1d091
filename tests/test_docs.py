"""Every fenced block of README.md, docs/*.md and configs/README.md runs.

A block says what it is. ``python`` blocks run, each file's in order in one namespace, in a scratch directory,
with tiny checkpoints standing in for the paths the examples name (``stand_ins``). ``bash`` lines run as far as
they can on this machine: ``python -m mgjax.train`` with ``--check`` (the config file and every ``--set`` are
read and checked), ``launch/*.sh`` with ``--dry-run`` (optional ``[...]`` parts dropped), ``pip install`` by
checking that the extras it names exist; ``pytest`` is this run. ``text`` blocks (outputs, layouts, what a
launcher runs) are shown, not run. A block without a language fails, as does a command nothing here knows how to
run."""

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import torch
import transformers
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from mgjax.train import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "configs" / "README.md"]
LANGUAGES = ("python", "bash", "text")


def blocks(path: Path) -> list[tuple[int, str, str]]:
    """(line, language, body) of each fenced block."""
    out, lines, at = [], path.read_text().splitlines(), None
    for i, line in enumerate(lines, 1):
        if line.startswith("```"):
            if at is None:
                at, language, body = i, line[3:].strip(), []
            else:
                out.append((at, language, "\n".join(body)))
                at = None
        elif at is not None:
            body.append(line)
    return out


def commands(body: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped, ``&&`` chains split."""
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            out.append(words[:cut])
            words = words[cut + 1 :]
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_names_its_language(doc):
    untagged = [f"{doc.name}:{line} ```{lang}" for line, lang, _ in blocks(doc) if lang not in LANGUAGES]
    assert not untagged, f"fenced blocks must be one of {LANGUAGES}: {untagged}"


def _required(words: list[str]) -> list[str]:
    """``words`` without their optional ``[--option VALUE]`` parts."""
    out, depth = [], 0
    for w in words:
        depth += w.startswith("[")
        if not depth:
            out.append(w)
        depth -= w.endswith("]")
    return out


def _check_constraints(path: Path, where: str):
    """A constraints file pins every runtime dependency, each inside the range pyproject.toml allows."""
    pins = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, eq, version = line.partition("==")
            assert eq, f"{path.name}: {line!r} is not NAME==VERSION"
            pins[canonicalize_name(name)] = version.strip()
    for dependency in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(dependency)
        name = canonicalize_name(req.name)
        assert name in pins, f"{where}: {path.name} does not pin {req.name}"
        assert req.specifier.contains(pins[name]), f"{where}: {req.name}=={pins[name]} is outside {req.specifier}"


def _run_shell(words: list[str], where: str):
    if words[0].startswith("python") and words[1:3] == ["-m", "pip"]:
        extras = re.findall(r"\[([^\]]*)\]", " ".join(words))
        known = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        for extra in ",".join(extras).split(","):
            assert not extra or extra in known, f"{where}: no extra {extra!r} in pyproject.toml"
        if "-c" in words:
            _check_constraints(ROOT / words[words.index("-c") + 1], where)
    elif words[0].startswith("python") and words[1:3] == ["-m", "pytest"]:
        pass  # this very run
    elif words[0].startswith("python") and words[1:3] == ["-m", "mgjax.train"]:
        assert cli.main([*words[3:], "--check"]) == 0, f"{where}: {shlex.join(words)}"
    elif words[0].startswith("launch/"):
        script, *args = _required(words)
        run = subprocess.run(["bash", script, "--dry-run", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, f"{where}: {shlex.join(words)}\n{run.stderr}"
    else:
        raise AssertionError(f"{where}: nothing here knows how to run {shlex.join(words)!r}")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_blocks_run(doc, monkeypatch):
    monkeypatch.chdir(ROOT)
    for line, language, body in blocks(doc):
        if language == "bash":
            for words in commands(body):
                _run_shell(words, f"{doc.name}:{line}")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_llama")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).save_pretrained(path)
    return path


@pytest.fixture
def stand_ins(llama_dir, internvl_dir, mgm_zoo):
    """Quoted paths in the examples -> tiny local stand-ins."""
    _, internvl = internvl_dir
    zoo, _ = mgm_zoo
    return {
        '"path/to/hf-llama"': llama_dir,
        '"path/to/InternVL2-1B"': internvl,
        '"cat.jpg"': internvl / "cat.png",
        '"path/to/MGM-7B"': zoo / "MGM-single",
        '"path/to"': zoo,
    }


@pytest.mark.parametrize(
    "doc", [d for d in DOCS if any(b[1] == "python" for b in blocks(d))], ids=lambda p: str(p.relative_to(ROOT))
)
def test_python_blocks_run(doc, stand_ins, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for line, language, body in blocks(doc):
        if language != "python":
            continue
        for quoted, path in stand_ins.items():
            body = body.replace(quoted, repr(str(path)))
        exec(compile(body, f"{doc.name}:{line}", "exec"), namespace)  # noqa: S102
