"""The package's layout holds what its docstrings promise: imports go one way along the data flow
(no circle, no upward import), no private name is imported across modules, every module is
small enough to read in one sitting, and a metric is declared in one place.

Read from the source with ``ast`` (nothing is imported), so a function-local import counts too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "induction_dynamics"
# The layers of the data flow, lowest first: a module imports only from its own layer or below.
LAYERS = [
    {"errors", "options", "files", "gpt_config", "untrusted"},
    {"run_dir", "model", "data", "wandb_logger"},
    {"checkpoint", "interpretability"},
    {"training"},
    {"analysis"},
    {"cli", "sampling"},
]
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["induction_dynamics", *parts])] = p
    return out


MODULES = _modules()


def _imports(path: Path, name: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every import of the project's modules."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("induction_dynamics")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("induction_dynamics"):
                continue
            for a in node.names:  # ``from pkg import submodule`` imports the submodule
                sub = f"{base}.{a.name}"
                found.append((sub, [], node.lineno) if sub in MODULES else (base, [a.name], node.lineno))
    return found


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"{module} is in no layer of LAYERS")


GRAPH = {m: {t for t, _, _ in _imports(p, m) if t != m} for m, p in MODULES.items()}


def test_no_import_circle():
    # Tarjan's strongly connected components; a package's __init__ re-exporting its submodules
    # is an edge like any other
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH.get(v, ()):
            if w not in MODULES:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for m in MODULES:
        if m not in index:
            visit(m)
    assert not circles, f"import circles: {circles}"


def test_imports_follow_the_data_flow():
    upward = [f"{m} (line {line}) imports {t}" for m, p in MODULES.items() for t, _, line in _imports(p, m)
              if t in MODULES and m != "induction_dynamics" and t != "induction_dynamics" and _layer(t) > _layer(m)]
    assert not upward, "imports against the data flow:\n" + "\n".join(upward)


def test_no_private_name_is_imported_across_modules():
    private = [f"{m} (line {line}) imports {t}.{n}" for m, p in MODULES.items() for t, names, line in _imports(p, m)
               for n in names if n.startswith("_")]
    assert not private, "\n".join(private)


def test_every_module_reads_in_one_sitting():
    long = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    assert {m: n for m, n in long.items() if n > MAX_LINES} == {}


def test_every_module_says_what_it_is_for():
    missing = [m for m, p in MODULES.items() if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, missing


@pytest.mark.parametrize("needle", [r"over 400 lines", r"on purpose", r"\bsession \d", r"\bstop \d", r"#\d+\b",
                                    r"\bissue \d", r"CACHE_VERSION = \d+ +# \d"])
def test_comments_tell_no_history(needle):
    hits = [m for m, p in MODULES.items() if re.search(needle, p.read_text(), re.IGNORECASE)]
    assert not hits, f"{needle!r} in {hits}"


def test_every_error_is_one_of_ours():
    """One base class: every public exception class the package defines is an InductionDynamicsError
    declared in errors.py, so the command line and errors.json report all of them in one line
    (a private one, such as the hook that ends a forward early, never leaves its module)."""
    elsewhere = [f"{m}.{node.name}" for m, p in MODULES.items() if not m.endswith(".errors")
                 for node in ast.walk(ast.parse(p.read_text()))
                 if isinstance(node, ast.ClassDef) and not node.name.startswith("_")
                 and any(getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception")) for b in node.bases)]
    assert elsewhere == [], elsewhere
