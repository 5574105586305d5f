"""Imports go one way (docs/design.md): server/ -> vita/ -> tts/ -> layers/, each package using only those below it."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOORS = ["server", "vita", "tts", "layers"]  # top to bottom


def project_imports(path: Path) -> set[str]:
    """The project packages a module imports (anywhere in it, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name.split(".")[0] for name in names} & set(FLOORS)
    return found


@pytest.mark.parametrize("package", FLOORS)
def test_a_package_imports_only_the_packages_below_it(package):
    allowed = set(FLOORS[FLOORS.index(package) :])
    modules = sorted((ROOT / package).glob("*.py"))
    assert modules
    wrong = {f"{m.relative_to(ROOT)} imports {sorted(project_imports(m) - allowed)}" for m in modules
             if project_imports(m) - allowed}
    assert not wrong
