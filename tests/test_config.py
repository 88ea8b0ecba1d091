"""Run configs: YAML with base inheritance, --set overrides, and errors that name the key and its source."""

from dataclasses import dataclass, field

import pytest

from mgjax import config
from mgjax.train.optim import OptimConfig


@dataclass(frozen=True)
class Data:
    path: str = ""
    max_length: int = 2048
    templates: tuple[str, ...] = ("v1",)


@dataclass(frozen=True)
class Run:
    data: Data = field(default_factory=Data)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int | None = field(default=None, metadata={"help": "None: one epoch"})


def test_yaml_base_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("data:\n  path: a.json\n  max_length: 4096\noptim:\n  lr: 1.0e-3\n")
    (tmp_path / "stage2.yaml").write_text("base: base.yaml\noptim:\n  lr: 2.0e-5\nsteps: 10\n")
    run = config.load(Run, tmp_path / "stage2.yaml", ["optim.clip_norm=1", "data.templates=[gemma, v1]"])
    assert run == Run(Data("a.json", 4096, ("gemma", "v1")), OptimConfig(lr=2e-5, clip_norm=1.0), 10)
    assert config.load(Run) == Run()


def test_unknown_keys_and_bad_values_name_their_source(tmp_path):
    (tmp_path / "x.yaml").write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(config.ConfigError, match=r"x.yaml: unknown key optim.learning_rate; known under optim\.: "):
        config.load(Run, tmp_path / "x.yaml")
    with pytest.raises(config.ConfigError, match=r"--set data.max_length=long: data.max_length must be int"):
        config.load(Run, sets=["data.max_length=long"])
    with pytest.raises(config.ConfigError, match="expected KEY=VALUE"):
        config.load(Run, sets=["optim.lr"])
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(config.ConfigError, match="cycle"):
        config.load(Run, tmp_path / "a.yaml")


def test_ranges_are_checked_where_configs_are_built():
    from mgjax.train.run_config import RunConfig

    with pytest.raises(config.ConfigError, match="train.global_batch=0: train.global_batch must be at least 1, not 0"):
        config.load(RunConfig, sets=["train.global_batch=0"])
    with pytest.raises(config.ConfigError, match="optim.warmup_ratio must be at most 1, not 2.0"):
        config.load(RunConfig, sets=["optim.warmup_ratio=2"])
    with pytest.raises(config.ConfigError, match="optim.lr must be a finite number, not inf"):
        config.load(RunConfig, sets=["optim.lr=.inf"])
    assert config.load(RunConfig, sets=["train.steps=0"]).train.steps == 0  # the bounds themselves are allowed


def test_describe_lists_every_field():
    lines = config.describe(Run)
    assert "data.max_length: int = 2048" in lines
    assert "optim.lr: float = 2e-05  # >= 0" in lines
    assert any(line.startswith("steps: ") and "# None: one epoch" in line for line in lines)


def test_commands_turn_on_a_persistent_compilation_cache(monkeypatch, tmp_path):
    import jax

    from mgjax import cli

    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    try:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        monkeypatch.delenv(cli.CACHE_ENV, raising=False)
        assert cli.compilation_cache() == str(tmp_path / "mgjax" / "jax") == jax.config.jax_compilation_cache_dir
        monkeypatch.setenv(cli.CACHE_ENV, str(tmp_path / "mine"))
        assert cli.compilation_cache() == str(tmp_path / "mine")
        monkeypatch.setenv(cli.CACHE_ENV, "off")
        assert cli.compilation_cache() is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax's own"))
    assert cli.compilation_cache() == str(tmp_path / "jax's own")
