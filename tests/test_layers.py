"""The layers stay apart: the engine imports no control plane, API or web code; the control plane no API or web
code (a worker, a CLI command or the OpenAI routes reuse it without FastAPI), and of the worker only its contract;
the worker no API or web code. Every import in the package is read,
also the ones inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import usf_bios

PACKAGE = Path(usf_bios.__file__).parent
FORBIDDEN = {"engine": ("control", "api", "web", "worker"), "control": ("api", "web", "worker"),
             "worker": ("api", "web")}
# the worker contract's models are shared by both sides of it: the worker and the control plane's remote executor
SHARED = ("usf_bios.worker.contract",)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def layer_violations(package: Path = PACKAGE) -> list[str]:
    problems = []
    for layer, banned in FORBIDDEN.items():
        for path in sorted((package / layer).rglob("*.py")):
            for line, module in imported_modules(path):
                parts = module.split(".")
                if module.startswith(SHARED) and layer == "control":
                    continue
                if parts[0] == "usf_bios" and len(parts) > 1 and parts[1] in banned:
                    problems.append(f"{path.relative_to(package.parent)}:{line} imports {module}")
    return problems


def test_no_lower_layer_imports_a_higher_one():
    assert layer_violations() == []


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    fake = tmp_path / "usf_bios"
    (fake / "control").mkdir(parents=True)
    (fake / "engine").mkdir()
    (fake / "control" / "bad.py").write_text("def f():\n    from usf_bios.api.deps import Caller\n")
    (fake / "engine" / "bad.py").write_text("import usf_bios.web.render\nfrom usf_bios import control\n")
    assert sorted(layer_violations(fake)) == ["usf_bios/control/bad.py:2 imports usf_bios.api.deps",
                                      "usf_bios/control/bad.py:2 imports usf_bios.api.deps.Caller",
                                      "usf_bios/engine/bad.py:1 imports usf_bios.web.render",
                                      "usf_bios/engine/bad.py:2 imports usf_bios.control"]
