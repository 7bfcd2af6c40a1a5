"""The code's layout holds: the rooms import only what they may, and nothing outgrows the size limits
(docs/code-map.md)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("pipeline", "stage_teacher", "stage_student", "eval")
MAX_FUNCTION, MAX_CLASS, MAX_MODULE, MAX_TOP_LEVEL = 60, 250, 450, 6


def product_files() -> list[Path]:
    return sorted(p for room in PRODUCT for p in (ROOT / room).rglob("*.py"))


def imported(path: Path) -> set[str]:
    """The top-level packages a file imports (absolute imports)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add((node.module or "").split(".")[0])
    return names


@pytest.mark.parametrize("room, forbidden", [("pipeline", {"stage_teacher", "stage_student", "eval"}),
                                             ("stage_teacher", {"stage_student"}), ("stage_student", {"stage_teacher"})])
def test_rooms_import_only_what_they_may(room, forbidden):
    bad = {str(p.relative_to(ROOT)): imported(p) & forbidden for p in (ROOT / room).rglob("*.py") if imported(p) & forbidden}
    assert not bad, bad


def test_no_function_class_or_module_over_the_limits():
    over = []
    for path in product_files():
        source = path.read_text()
        name = str(path.relative_to(ROOT))
        if len(source.splitlines()) > MAX_MODULE:
            over.append((name, "module", len(source.splitlines())))
        for node in ast.walk(ast.parse(source)):
            length = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and length > MAX_FUNCTION:
                over.append((f"{name}:{node.name}", "function", length))
            if isinstance(node, ast.ClassDef) and length > MAX_CLASS:
                over.append((f"{name}:{node.name}", "class", length))
    assert not over, over


def test_stage_two_top_level_is_small_and_each_sub_package_lists_its_files():
    top = [p.name for p in (ROOT / "stage_student").glob("*.py") if p.name != "__init__.py"]
    assert len(top) <= MAX_TOP_LEVEL, top
    for package in (p for p in (ROOT / "stage_student").iterdir() if (p / "__init__.py").exists()):
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
        unlisted = [p.name for p in package.glob("*.py") if p.name != "__init__.py" and p.name not in doc]
        assert not unlisted, (package.name, unlisted)
