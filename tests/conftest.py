import gc
import os
import shutil
import tempfile

# Parity tests compare float32 numbers: make XLA's CPU matmuls use full precision, and keep tests single-device.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests build their models; nothing may come from a hub
# PyTorch references run on its scalar CPU kernels: the AVX2 and AVX-512 ones round pow differently from each
# other (see mgjax/nn/rope.py), so a reference would otherwise depend on the CPU CI lands on. Set before torch loads.
os.environ.setdefault("ATEN_CPU_CAPABILITY", "default")
# One persistent compilation cache per test run, shared with the processes tests start (training runs,
# multi-process meshes): the demo's programs compile once, not in every process (4 training tests: 133 s -> 102 s).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE = tempfile.mkdtemp(prefix="mgjax-tests-jax-cache-")
# The suite compiles hundreds of small programs and runs each briefly: XLA:CPU's LLVM at -O0 without its expensive
# passes compiles them 2.3x faster (tests/test_train_step.py: 145 s -> 63 s). XLA's own (HLO) passes still run, and
# TPU programs (deviceless, libtpu) compile as before. Processes the tests start inherit the flags.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
).strip()
# deviceless TPU compiles (tests/test_tpu_compile.py) load libtpu beside processes tests start that load it too
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module", autouse=True)
def _drop_compiled_programs():
    """Free each test file's compiled programs when it ends. XLA's CPU backend maps every executable's code
    separately and jit caches keep them all: a whole run passed Linux's 65,530 memory maps per process
    (vm.max_map_count) and LLVM crashed the next compile (segfault in CI, 2026-12-06)."""
    yield
    jax.clear_caches()
    gc.collect()


def pytest_sessionfinish(session, exitstatus):
    if "_CACHE" in globals():
        shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture
def report(request):
    """Print a measured error so it shows in the test log (``-rA`` / ``-s``) and in the closing notes."""

    def _report(name: str, value: float, bound: float):
        print(f"[parity] {request.node.name}: {name} max-abs {value:.3e} (bound {bound:.0e})")
        assert value <= bound, f"{name}: max-abs {value:.3e} > {bound:.0e}"

    return _report


@pytest.fixture(scope="module")
def internvl_dir(tmp_path_factory):
    """A tiny InternVL2 checkpoint (Qwen2) with a word-level tokenizer and a 70x30 ``cat.png``: (hf model, path)."""
    from PIL import Image

    from tests.helpers import WORDS, internvl_hf_model, tokenizer

    path = tmp_path_factory.mktemp("internvl_cli")
    hf = internvl_hf_model("qwen2")
    hf.config.image_token_id = WORDS.index("<IMG_CONTEXT>")
    hf.save_pretrained(path)
    tokenizer().save_pretrained(path)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 70, 3), dtype=np.uint8)).save(path / "cat.png")
    return hf, path


@pytest.fixture(scope="session")
def mgm_zoo(tmp_path_factory):
    """An MGM checkpoint in MGM's own layout with its towers in a ``model_zoo/`` beside it
    (``tests/helpers.make_zoo``): (root, PyTorch reference)."""
    from tests.helpers import make_zoo

    return make_zoo(tmp_path_factory.mktemp("mgm_zoo"))
