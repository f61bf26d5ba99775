"""Imports point down only, read from the source (every import statement, function-level ones too):

    entry points (train.py, evaluate.py)
      → train / eval / serve (preflight: their start-up check; parity, plot: tools)
        → model / loss / augment / data / convert / checkpoints / variants (TrainConfig)
          → nn / cameras / masks / prompt / config (and logs, lock)

and the package graph (eqx_pi05.<first component>) has no cycle."""

import ast
import pathlib

from conftest import REPO

LAYERS = {
    0: ("config", "cameras", "masks", "prompt", "nn", "logs", "lock"),
    1: ("model", "loss", "augment", "trainable", "data", "convert", "checkpoints", "variants"),
    2: ("train", "eval", "serve", "parity", "plot", "preflight"),
}
# Packages of one layer that must not import each other either (serve is built on the eval policy).
SIDEWAYS = {("train", "eval"), ("train", "serve"), ("eval", "train"), ("eval", "serve")}
ENTRY_POINTS = ("train.py", "evaluate.py")
# Imports known to point up, each with the change that removes it (keep this empty).
PENDING: set[tuple[str, str]] = set()


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "eqx_pi05" and len(parts) > 1 else None


def _rank(package: str) -> int:
    return next(rank for rank, names in LAYERS.items() if package in names)


def _imports(path: pathlib.Path) -> set[str]:
    """Absolute eqx_pi05 modules imported by `path` (`from eqx_pi05 import x` counts as eqx_pi05.x)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("eqx_pi05")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("eqx_pi05"):
            if node.module == "eqx_pi05":
                out |= {f"eqx_pi05.{a.name}" for a in node.names}
            else:
                out.add(node.module)
    return out


def _edges() -> set[tuple[str, str, str]]:
    """(file, importing package, imported package) for every import between two eqx_pi05 packages
    (less the PENDING ones)."""
    edges = set()
    for path in sorted((REPO / "eqx_pi05").rglob("*.py")):
        rel = path.relative_to(REPO)
        source = _package(".".join(rel.with_suffix("").parts))
        if source in (None, "__init__"):  # eqx_pi05/__init__.py: the public API re-exports from every layer
            continue
        for module in _imports(path):
            target = _package(module)
            if target is not None and target != source and (str(rel), module) not in PENDING:
                edges.add((str(rel), source, target))
    return edges


def test_every_package_has_a_layer():
    packages = {p.stem if p.is_file() else p.name for p in (REPO / "eqx_pi05").iterdir()
                if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assigned = {name for names in LAYERS.values() for name in names}
    assert packages <= assigned, f"packages without a layer in this test: {sorted(packages - assigned)}"


def test_imports_point_down_only():
    wrong = [f"{file}: {source} (layer {_rank(source)}) imports {target} (layer {_rank(target)})"
             for file, source, target in _edges()
             if _rank(target) > _rank(source) or (source, target) in SIDEWAYS]
    assert not wrong, "\n".join(sorted(wrong))


def test_entry_points_are_the_top():
    imported = {m for p in (REPO / "eqx_pi05").rglob("*.py") for m in _imports(p)}
    assert not {m for m in imported if m.split(".")[0] in {e.removesuffix(".py") for e in ENTRY_POINTS}}
    for entry in ENTRY_POINTS:
        assert _imports(REPO / entry), f"{entry} imports nothing from eqx_pi05"


def test_the_package_graph_has_no_cycle():
    graph: dict[str, set[str]] = {}
    for _, source, target in _edges():
        graph.setdefault(source, set()).add(target)
    done, active = set(), []

    def visit(node):
        if node in active:
            raise AssertionError(f"package cycle: {' -> '.join(active[active.index(node):] + [node])}")
        if node in done:
            return
        active.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        active.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
