"""The rules the codebase keeps, checked on every run of the suite.

No import cycles (module-level and function-level imports alike), no module over 600 lines, no other package's
private names outside the opt-in ``qa_service/tuning/`` folder, no run dates in code, every linked decision page
present, Markdown within its size budget, no talk of how the work was organised, and ruff clean.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .support.paths import REPO

PACKAGES = ("qa_service", "benchmarks")
MAX_MODULE_LINES = 600
README_MAX_BYTES = 12_000
MARKDOWN_MAX_BYTES = 80_000
# Underscore names that are documented public API of the standard library (os._exit, namedtuple's methods, enum's
# hooks), not internals.
PUBLIC_UNDERSCORE = {"_exit", "_asdict", "_replace", "_fields", "_make", "_field_defaults", "_missing_",
                     "_value_", "_name_", "_generate_next_value_", "_ignore_"}
# The one patch of another package kept by default: gunicorn's own 400/414/431 answers in the service's error
# shape, under an upper version pin of gunicorn in pyproject.toml.
ALLOWED_PATCHES = {"gunicorn.util.write_error"}
SETTINGS_OBJECTS = ("faiss.cvar",)  # a package's documented global settings, set by assignment
RUN_DATE = re.compile(r"(?<![\d-])1[012]-[0-3]\d(?![\d-])")
# Written with \s so that this file does not itself read as such talk to a plain grep.
ORGANISATION_TALK = re.compile(r"(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth)\ssession|"
                               r"this\ssession|the\sowner\swas\sasked|the\sissue\sasks", re.IGNORECASE)
DECISION_LINK = re.compile(r"docs/decisions/([\w.-]+\.md)")


def _modules() -> dict[str, Path]:
    mods = {}
    for root in PACKAGES:
        for path in sorted((REPO / root).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _tracked(*patterns: str) -> list[Path]:
    """Files git tracks under ``patterns`` (every matching file when this is not a git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", *patterns], cwd=REPO, capture_output=True, check=True)
        return [REPO / p for p in out.stdout.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        return sorted({p for pattern in patterns for p in REPO.glob("**/" + pattern.lstrip("*/"))
                       if ".venv" not in p.parts})


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of import nodes under ``if TYPE_CHECKING:`` (never executed, so not a dependency at run time)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    return skipped


def import_graph() -> dict[str, set[str]]:
    """Map each module of ``qa_service/`` and ``benchmarks/`` to the modules of those trees it imports anywhere."""
    mods = _modules()

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = _type_checking_nodes(tree)
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        edges = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                source = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                # ``from pkg import sub`` depends on the submodule; ``from pkg import name`` on the package.
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in mods else source for a in node.names]
            else:
                continue
            edges.update(t for t in map(known, targets) if t and t != mod)
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_no_module_over_600_lines():
    long = {str(p.relative_to(REPO)): n for p in _modules().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def _own_underscore_names() -> set[str]:
    """Every underscore name the project defines itself (functions, classes, attributes, variables, arguments)."""
    names = set()
    for path in list(_modules().values()) + sorted((REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.keyword) and node.arg:
                names.add(node.arg)
            elif isinstance(node, ast.alias):
                names.add(node.asname or node.name.split(".")[0])
    return {n for n in names if n.startswith("_")}


def _foreign_imports(tree: ast.AST) -> dict[str, tuple[str, str | None]]:
    """Names bound by imports of other packages: name -> (module, attribute or None for the module itself)."""
    imported = {}
    for stmt in ast.walk(tree):
        if isinstance(stmt, ast.ImportFrom) and not stmt.level and stmt.module and \
                stmt.module.split(".")[0] not in PACKAGES:
            imported.update({a.asname or a.name: (stmt.module, a.name) for a in stmt.names})
        elif isinstance(stmt, ast.Import):
            imported.update({a.asname or a.name.split(".")[0]: (a.name if a.asname else a.name.split(".")[0], None)
                             for a in stmt.names if a.name.split(".")[0] not in PACKAGES})
    return imported


def _foreign_bases(tree: ast.AST, node: ast.ClassDef) -> list[type]:
    """The classes of other packages that ``node`` derives from (resolved by importing them)."""
    imported = _foreign_imports(tree)
    bases = []
    for base in node.bases:
        chain = ast.unparse(base).split(".")
        if chain[0] not in imported:
            continue
        module, name = imported[chain[0]]
        try:
            obj = importlib.import_module(module)
            for attr in ([name] if name else []) + chain[1:]:
                obj = getattr(obj, attr)
        except (ImportError, AttributeError):
            continue
        if isinstance(obj, type):
            bases.append(obj)
    return bases


def private_uses(path: Path, own: set[str]) -> list[str]:
    """Where ``path`` reaches into another package's private names: ``x._name``, ``from pkg._mod import``, ``from
    pkg import _name``, overrides of a foreign class's private methods, and assignments into a foreign module,
    for underscore names (not dunders) the project does not define itself."""
    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__") and name not in PUBLIC_UNDERSCORE

    where = path.relative_to(REPO) if REPO in path.parents else Path(path.name)
    service = where.parts[0] != "benchmarks"  # the bench may wrap public methods to trace them; the service may not
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules = {name for name, (module, attr) in _foreign_imports(tree).items()
               if attr is None and module.split(".")[0] not in sys.stdlib_module_names}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and \
                ast.unparse(node.value).split(".")[0] in modules:
            patched = f"{ast.unparse(node.value)}.{node.attr}"
            if service and patched not in ALLOWED_PATCHES and not patched.startswith(SETTINGS_OBJECTS):
                found.append(f"{where}:{node.lineno} patches {patched}")
        if isinstance(node, ast.ClassDef):
            bases = _foreign_bases(tree, node)
            found += [f"{where}:{d.lineno} overrides {b.__name__}.{d.name}" for d in node.body
                      if isinstance(d, (ast.FunctionDef, ast.AsyncFunctionDef)) and private(d.name)
                      for b in bases if hasattr(b, d.name)]
        if isinstance(node, ast.Attribute) and private(node.attr) and node.attr not in own:
            found.append(f"{where}:{node.lineno} .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module and \
                node.module.split(".")[0] not in PACKAGES:
            parts = node.module.split(".") + [a.name for a in node.names]
            found += [f"{where}:{node.lineno} from {node.module} import {p}" for p in parts if private(p)]
        elif isinstance(node, ast.Import):
            found += [f"{where}:{node.lineno} {a.name}" for a in node.names
                      if any(private(p) for p in a.name.split("."))]
    return found


def test_the_private_name_finder_sees_foreign_internals(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import ray\nfrom ray._private import ray_constants\nfrom gunicorn import _x\n"
                      "ray._node_ip_address\nclass R:\n    def f(self):\n        return super()._emit_body(1)\n"
                      "from threading import Thread\nclass T(Thread):\n    def _bootstrap(self):\n        pass\n"
                      "    def _mine(self):\n        pass\n"
                      "import gunicorn.http.wsgi as wsgi\nwsgi.Response = T\n")
    assert len(private_uses(sample, own=set())) == 6
    assert len(private_uses(sample, own={"_node_ip_address", "_emit_body"})) == 4


def test_no_private_names_of_other_packages_outside_the_tuning_folder():
    own = _own_underscore_names()
    tuning = REPO / "qa_service" / "tuning"
    uses = [u for p in _modules().values() if tuning not in p.parents for u in private_uses(p, own)]
    assert uses == []


def test_no_run_dates_in_code():
    dated = [f"{p.relative_to(REPO)}:{i}" for p in _modules().values()
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if RUN_DATE.search(line)]
    assert dated == []


def test_every_linked_decision_page_exists():
    sources = list(_modules().values()) + sorted((REPO / "tests").rglob("*.py")) + _tracked("*.md")
    missing = sorted({f"{p.relative_to(REPO)} -> {m}" for p in sources if p.exists()
                      for m in DECISION_LINK.findall(p.read_text(encoding="utf-8"))
                      if not (REPO / "docs" / "decisions" / m).exists()})
    assert missing == []


def test_markdown_stays_within_its_budget():
    assert (REPO / "README.md").stat().st_size <= README_MAX_BYTES
    sizes = {str(p.relative_to(REPO)): p.stat().st_size for p in _tracked("*.md") if p.exists()}
    assert sum(sizes.values()) <= MARKDOWN_MAX_BYTES, sorted(sizes.items(), key=lambda kv: -kv[1])[:10]


def test_the_repository_speaks_of_the_project_alone():
    talk = [str(p.relative_to(REPO)) for p in _tracked("*.md", "*.py")
            if p.exists() and ORGANISATION_TALK.search(p.read_text(encoding="utf-8"))]
    assert talk == []


def test_benchmark_results_track_only_the_latest_run():
    tracked = [p.name for p in _tracked("benchmarks/results/*")]
    assert set(tracked) <= {"latest.md", "latest.json", ".gitkeep"}, tracked


def test_ruff_is_clean():
    ruff = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO,
                          capture_output=True, text=True)
    if ruff.returncode != 0 and "No module named ruff" in ruff.stderr:
        pytest.fail("ruff is not installed: `pip install -e .[test]` (it is in the test extra)")
    assert ruff.returncode == 0, ruff.stdout[-4000:]
