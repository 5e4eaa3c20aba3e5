"""The layout is the architecture (ARCHITECTURE.md): who may import whom, and what each image holds."""

import ast
import re
from pathlib import Path

import pytest

from local import ROOT

PROJECT_PACKAGES = ("shared", "functions", "local", "tests", "bench", "demo_data", "train", "keys")


def imports_of(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (top-level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def python_files(folder: str) -> list[Path]:
    return sorted(path for path in (ROOT / folder).rglob("*.py") if not hidden(path))


def hidden(path: Path) -> bool:
    """Under a dot folder: venvs (.venv, bench/.venv-kserve) and caches, never the project's code."""
    return any(part.startswith(".") for part in path.relative_to(ROOT).parts)


def project_imports(path: Path) -> set[str]:
    return {name for name in imports_of(path) if name.split(".")[0] in PROJECT_PACKAGES}


# (folder, what its modules must never import): the rules of ARCHITECTURE.md.
RULES = [
    ("shared", ("functions", "local", "tests", "bench", "demo_data", "train", "keys", "tensorflow")),
    ("functions", ("local", "tests", "bench", "demo_data", "train", "keys", "tensorflow")),
    ("functions/token", ("functions.predict", "shared.imaging", "numpy", "PIL", "ai_edge_litert")),
    ("functions/predict", ("functions.token",)),
    ("local", ("functions", "tests", "bench", "train", "tensorflow")),
    ("bench", ("tests",)),
]


@pytest.mark.parametrize("folder, forbidden", RULES, ids=[rule[0] for rule in RULES])
def test_import_rules(folder, forbidden):
    broken = []
    for path in python_files(folder):
        for name in imports_of(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                broken.append(f"{path.relative_to(ROOT)} imports {name}")
    assert broken == []


def test_the_rules_catch_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from local.stack import main\n")
    assert "local.stack" in imports_of(bad)


def shared_closure(function: str) -> set[str]:
    """The shared/ files an image of functions/<function>/ needs: the server it starts with
    (shared/server.py) and what that function imports, transitively."""
    todo = [*python_files(f"functions/{function}"), ROOT / "shared" / "server.py"]
    needed: set[str] = {"shared/__init__.py", "shared/server.py"}
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in project_imports(path):
            parts = name.split(".")
            if parts[0] != "shared" or len(parts) < 2:
                continue
            module = ROOT / "shared" / f"{parts[1]}.py"
            if module.exists():
                needed.add(f"shared/{parts[1]}.py")
                todo.append(module)
    return needed


def copied_shared_files(dockerfile: Path) -> set[str]:
    text = dockerfile.read_text().replace("\\\n", " ")
    copied = set()
    for line in text.splitlines():
        if line.startswith("COPY ") and "/app/shared/" in line:
            copied |= set(re.findall(r"shared/\w+\.py", line))
    return copied


@pytest.mark.parametrize("function", ["token", "predict"])
def test_each_image_copies_exactly_the_shared_modules_its_function_imports(function):
    assert copied_shared_files(ROOT / "functions" / function / "Dockerfile") == shared_closure(function)


def test_token_image_has_no_imaging_and_no_image_copies_the_local_stack():
    assert "shared/imaging.py" not in shared_closure("token")
    for dockerfile in (ROOT / "functions").glob("*/Dockerfile"):
        assert not re.search(r"^COPY .*\blocal/", dockerfile.read_text(), re.M)
        assert "COPY shared/ " not in dockerfile.read_text()  # never the whole folder


def test_no_sys_path_edits():
    offenders = [
        str(path.relative_to(ROOT))
        for path in ROOT.rglob("*.py")
        if not hidden(path) and "sys.path.insert" in path.read_text() and path != Path(__file__)
    ]
    assert offenders == []
