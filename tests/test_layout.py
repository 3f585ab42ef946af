"""The structure the README's Layout section promises, read from the code itself (ast):

* ``models/`` is pure: no Prefect, database, MLflow or I/O layer imports;
* nobody imports a ``_private`` name from another module (tests included);
* no two project files import each other, directly or around a longer circle;
* no source file outside tests and migrations is longer than ``MAX_LINES``;
* every entry of ``models.catalog`` resolves to a class of the protocol it is registered for.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("emowatch", "models", "db", "tasks", "flows", "deployments", "bench")
MAX_LINES = 450


def _sources(include_tests: bool = False) -> list[Path]:
    roots = PACKAGES + (("tests",) if include_tests else ())
    return sorted(p for r in roots for p in (REPO / r).rglob("*.py")
                  if "migrations" not in p.parts)


def _module(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import statement in the file (any depth, TYPE_CHECKING too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return out


def test_models_is_pure():
    forbidden = ("prefect", "sqlalchemy", "mlflow", "evidently", "db", "tasks", "flows",
                 "deployments")
    bad = [(p.relative_to(REPO).as_posix(), m) for p in (REPO / "models").rglob("*.py")
           for m, _ in _imports(p) if m.split(".")[0] in forbidden]
    assert bad == []


def test_no_private_name_is_imported_across_modules():
    bad = [(p.relative_to(REPO).as_posix(), m, n) for p in _sources(include_tests=True)
           for m, names in _imports(p) for n in names
           if n.startswith("_") and not n.startswith("__")]
    assert bad == []


def test_no_circular_imports_between_project_files():
    modules = {_module(p): p for p in _sources()}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, p in modules.items():
        for target, names in _imports(p):
            if target in modules:
                graph[m].add(target)
            for n in names:  # "from db import sites" imports the module db.sites
                if f"{target}.{n}" in modules:
                    graph[m].add(f"{target}.{n}")
    graph = {m: {t for t in ts if t != m and not m.startswith(t + ".")} for m, ts in graph.items()}
    # Tarjan's strongly connected components: any component of 2+ files is a circle
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    assert circles == []


def test_no_source_file_is_a_god_module():
    long = {p.relative_to(REPO).as_posix(): n for p in _sources()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


@pytest.mark.parametrize(("table", "kind", "protocol"), [
    ("DETECTORS", "detector", "models.drift.base:Detector"),
    ("ADAPTERS", "adapter", "models.adapt.base:Adapter"),
    ("GATES", "gate", "models.validate.gates:Gate"),
    ("ESTIMATORS", "estimator", "models.estimate.base:Estimator"),
    ("RECIPES", "recipe", "models.adapt.recipes:Recipe"),
    ("EXPLAINERS", "explainer", "models.explain.base:Explainer"),
])
def test_every_catalog_entry_is_a_class_of_its_protocol(table, kind, protocol):
    import importlib

    from models import catalog

    module, _, name = protocol.partition(":")
    base = getattr(importlib.import_module(module), name)
    for key in getattr(catalog, table):
        cls = catalog.load(kind, key)
        if kind == "estimator" and getattr(cls, "needs_images", False):  # the site twin
            assert callable(getattr(cls, "estimate_images", None)), (key, cls)
            continue
        assert isinstance(cls, type) and issubclass(cls, base), (key, cls)
    with pytest.raises(ValueError, match="unknown"):
        catalog.load(kind, "no-such-thing")


def test_portfolio_kind_names_live_in_the_catalog_only():
    """A portfolio recipe's name (``models.catalog.RECIPES``) is spelled in the catalog and
    nowhere else in the product code: the portfolio asks the recipe class what it needs."""
    from models import catalog

    names = [k for k in catalog.RECIPES if k not in catalog.ADAPTERS]  # bn, bn-all, mmd-backbone
    spelled = {}
    for p in _sources():
        if p.name in ("catalog.py", "__init__.py") or p.parts[-2] == "bench":
            continue  # (a family __init__'s strings name its modules: models/adapt/bn.py)
        text = p.read_text(encoding="utf-8")
        hits = [n for n in names if f'"{n}"' in text or f"'{n}'" in text]
        if hits:
            spelled[p.relative_to(REPO).as_posix()] = hits
    assert spelled == {}
