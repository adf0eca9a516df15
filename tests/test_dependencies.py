"""Every package that src/ imports is declared in pyproject.toml (a clean install brings it).

An import at module level must come from the standard library, the project or
``[project.dependencies]``: it runs whenever the module is imported. An import inside a
function may also come from an optional extra (``transformer_lens``, ``devinterp``): it runs
only when that feature is asked for.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions, version
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _requirement_names(reqs: list[str]) -> set[str]:
    names = set()
    for r in reqs:
        name = re.match(r"[A-Za-z0-9_.\-]+", r).group(0)
        names.add(re.sub(r"[-_.]+", "-", name).lower())
    return names


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = _requirement_names(project["dependencies"])
    extras = set()
    for reqs in project.get("optional-dependencies", {}).values():
        extras |= _requirement_names(reqs)
    return core, extras - {"induction-dynamics"}


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(top-level module, at module level?, line) for every absolute import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(n) for n in ast.walk(node) if n is not node}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(n.split(".")[0], id(node) not in in_function, node.lineno) for n in names]
    return found


def _distributions(module: str) -> set[str]:
    return {re.sub(r"[-_.]+", "-", d).lower() for d in packages_distributions().get(module, [])}


def test_every_import_of_src_is_declared():
    core, extras = _declared()
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        for module, top_level, line in _imports(path):
            if module in sys.stdlib_module_names or module == "induction_dynamics":
                continue
            dists = _distributions(module)
            where = f"{path.relative_to(ROOT)}:{line} imports {module}"
            if not dists:
                problems.append(f"{where}, which no installed distribution provides")
            elif not dists & (core if top_level else core | extras):
                need = "[project.dependencies]" if top_level else "the dependencies or an extra"
                problems.append(f"{where} ({', '.join(sorted(dists))}), not declared in {need}")
    assert not problems, "\n".join(problems)


def test_declared_floors_hold_for_the_installed_packages():
    """The floors say what the code needs; the environment the tests run in must meet them."""
    packaging_version = pytest.importorskip("packaging.version")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for v in project["optional-dependencies"].values() for r in v]
    low = []
    for r in reqs:
        m = re.match(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*>=\s*([0-9][0-9a-zA-Z.]*)", r)
        if not m or m.group(1) == "induction-dynamics":
            continue
        have = packaging_version.Version(version(m.group(1)))
        if have < packaging_version.Version(m.group(2)):
            low.append(f"{m.group(1)} {have} < {m.group(2)}")
    assert not low, ", ".join(low)
