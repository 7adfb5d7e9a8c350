"""The package's layers import only downward (docs/design.md): a reader who knows a layer knows what it can use."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "cascade"
# Lower number = lower layer. Layers of equal rank do not import each other.
RANK = {
    "utils": 0,
    "diffusion": 1,
    "nn": 1,
    "data": 1,
    "roles": 2,
    "training": 3,
    "evaluation": 4,
    "interop": 4,
    "pipeline": 5,
    "tools": 6,
}


def _layer(module: str) -> str:
    return module.split(".")[1]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cascade."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cascade."))
    return found


def test_every_layer_imports_only_lower_layers():
    assert {p.name.removesuffix(".py") for p in ROOT.iterdir() if p.name != "__init__.py" and "__" not in p.name} == set(RANK)
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        own = path.relative_to(ROOT).parts[0].removesuffix(".py")
        for module in _imports(path):
            other = _layer(module)
            if other != own and RANK[other] >= RANK[own]:
                wrong.append(f"{path.relative_to(ROOT.parent)} imports {module}")
    assert not wrong, "\n".join(wrong)
