"""The structure docs/architecture.md describes, checked: module sizes, one-way imports, Composer-free layers, and a
page that names every module. Read from the source with ``ast`` (nothing is imported), so a failure names the file."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "blurpool_algo"
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"
MAX_LINES = 500

#: Modules that must work in any PyTorch model: no Composer import (DESIGN.md: layers and metrics import no Composer).
COMPOSER_FREE = (
    "checks", "files", "filters", "layers", "options", "exclusion", "rules", "layer_rules", "resnet_rules", "surgery",
    "metrics", "callbacks.peak_memory", "checkpoint_files", "resume", "summary",
)  # fmt: skip


def _modules() -> dict[str, Path]:
    """Dotted name below the package (``layers.blur``, ``layers`` for its ``__init__``) -> file."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name or "__init__"] = path
    return found


def _top_level_imports(path: Path) -> set[str]:
    """What importing ``path`` imports of this package (dotted names below it: ``data.specs``, or ``data`` for an
    attribute of the package) and ``composer``; not under TYPE_CHECKING, not inside functions."""
    tree = ast.parse(path.read_text(), str(path))
    modules = _modules()
    found = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef):
                break
            if isinstance(inner, ast.Import):
                names = [alias.name for alias in inner.names]
            elif isinstance(inner, ast.ImportFrom) and not inner.level:
                base = inner.module or ""
                # `from blurpool_algo.data import specs` imports the submodule; `... import DataError` the package.
                names = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}".removeprefix("blurpool_algo.") in modules else base
                    for alias in inner.names
                ]
            else:
                continue
            for name in names:
                if name == "composer" or name.startswith("composer."):
                    found.add("composer")
                elif name.startswith("blurpool_algo."):
                    found.add(name.removeprefix("blurpool_algo."))
    return found


def _internal_graph() -> dict[str, set[str]]:
    """Module -> the modules of this package it imports; a package's ``__init__`` re-exporting its own submodules is
    part of the package, not an arrow."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _top_level_imports(path) - {"composer"}:
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not imported.startswith(name + "."):
                targets.add(imported)
        graph[name] = targets
    return graph


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_module_over_the_size_limit(name):
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"blurpool_algo/{name}: {lines} lines > {MAX_LINES}: split it by job"


def test_imports_form_no_cycle():
    graph = _internal_graph()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        for target in sorted(graph[node]):
            if target in path:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(target) :], target]))
            if target not in done:
                visit(target, [*path, target])
        done.add(node)

    for start in sorted(graph):
        if start not in done:
            visit(start, [start])


def test_the_cycle_check_finds_a_planted_cycle(monkeypatch):
    # Control: the same walk over a graph with a cycle must fail.
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    monkeypatch.setitem(globals(), "_internal_graph", lambda: planted)
    with pytest.raises(pytest.fail.Exception, match=r"import cycle: a -> b -> c -> a"):
        test_imports_form_no_cycle()


@pytest.mark.parametrize("name", COMPOSER_FREE)
def test_torch_only_modules_import_no_composer(name):
    modules = _modules()
    members = [m for m in modules if m == name or m.startswith(name + ".")]
    assert members, f"no module {name}"
    graph = _internal_graph()  # once: it parses every module of the package
    reached, todo = set(), list(members)
    while todo:  # everything they import, transitively, must be free of Composer too
        module = todo.pop()
        if module in reached:
            continue
        reached.add(module)
        imported = _top_level_imports(modules[module])
        assert "composer" not in imported, f"blurpool_algo/{module} (reached from {name}) imports composer"
        todo += [target for target in graph[module] if target not in reached]


def test_the_composer_check_sees_a_composer_import():
    # Control: a module known to import Composer is found to.
    assert "composer" in _top_level_imports(_modules()["algorithm"])


def test_architecture_page_names_every_module():
    page = ARCHITECTURE.read_text()
    missing = []
    for name, path in _modules().items():
        if name == "__init__":
            continue
        written = f"{path.stem}.py" if path.stem != "__init__" else f"{name.split('.')[-1]}/"
        if written not in page:
            missing.append(f"blurpool_algo/{name} ({written})")
    assert not missing, f"docs/architecture.md does not name {missing}"


def test_the_layers_surgery_and_metrics_run_where_composer_is_not_installed():
    # A machine with torch only (an export or inference box, a lent GPU) must be able to use what DESIGN.md calls
    # Composer-free: importing them must not import the package's Composer modules through blurpool_algo/__init__.
    # Composer is made unimportable in a fresh interpreter; the Composer names fail only when asked for.
    script = textwrap.dedent(
        """
        import sys
        sys.modules["composer"] = None  # `import composer` now raises ImportError
        import torch
        from blurpool_algo import BlurPool2d, apply_blurpool, shift_consistency
        from blurpool_algo.layers import BlurMaxPool1d
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.MaxPool2d(2))
        assert apply_blurpool(net, min_channels=0).num_replaced == 2
        assert BlurPool2d(8)(torch.ones(1, 8, 5, 5)).shape == (1, 8, 3, 3)
        assert BlurMaxPool1d(3, 2)(torch.ones(1, 2, 9)).shape == (1, 2, 4)
        try:
            from blurpool_algo import BlurPool
        except ImportError as error:
            print("refused:", error)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused:" in result.stdout and "composer" in result.stdout
