"""The package layers of docs/architecture.md: a module imports only from its own layer and the ones below it (any
import, at the top of a module or inside a function), and every module belongs to a layer."""

import ast
import inspect
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mgjax"
# bottom to top; a name is a package of mgjax or one of its top-level modules
LAYERS = [
    {"config", "cli", "parallel"},
    {"kernels"},
    {"nn"},
    {"convert"},
    {"models", "pretrained", "__init__"},
    {"recipes"},
    {"data"},
    {"inference"},
    {"eval"},
    {"demo"},
    {"train"},
    {"generate", "chat", "serve", "web", "plan", "formatters", "quantize"},  # `python -m mgjax.<command>` launchers
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _unit(module: str) -> str:
    """``mgjax.nn.layers`` -> ``nn``; ``mgjax.pretrained`` -> ``pretrained``; ``mgjax`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    """The mgjax modules ``path`` imports (``from mgjax import x`` names ``mgjax.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "mgjax"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mgjax":
            found |= {f"{node.module}.{a.name}" if node.module == "mgjax" else node.module for a in node.names}
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_never_go_up_a_layer(path):
    rel = path.relative_to(PACKAGE)
    mine = rel.parts[0] if len(rel.parts) > 1 else rel.stem
    assert mine in RANK, f"{rel} is in no layer of this test (and of docs/architecture.md)"
    up = sorted(m for m in _imports(path) if RANK.get(_unit(m), -1) > RANK[mine])
    assert not up, f"{rel} ({mine}, layer {RANK[mine]}) imports from a higher layer: {up}"


def test_the_layers_are_documented():
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for layer in LAYERS:
        for name in layer - {"__init__"}:
            shown = f"`{name}/`" if (PACKAGE / name).is_dir() else f"{name}.py"
            assert shown in doc, f"docs/architecture.md does not describe {shown}"


def test_every_family_implements_the_family_interface():
    """``mgjax.train.families.Family``: every family has each member, methods with the interface's parameters."""
    from mgjax.train import families

    protocol = {n: m for n, m in vars(families.Family).items() if inspect.isfunction(m) and not n.startswith("_")}
    for name, family in families.FAMILIES.items():
        assert isinstance(family, families.Family), name
        for method, spec in protocol.items():
            mine = list(inspect.signature(getattr(family, method)).parameters)
            assert mine == list(inspect.signature(spec).parameters)[1:], f"{name}.{method}: {mine}"
