"""The layout is the architecture: each subpackage of fastlmdb imports only from the floors
below it (read from the source with ast, so an import hidden in a function counts too), the
import graph has no cycle, and only `loading` imports torch when its module is imported."""

import ast
import collections
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fastlmdb")
# Floor of each subpackage: an import may only point to a lower floor. `version` is where any
# module may import __version__ from; `testing` (sample trees) depends on nothing of ours.
FLOORS = {"version": 0, "core": 1, "sources": 2, "loading": 2, "testing": 2, "converter": 3,
          "tools": 4, "cli": 5}
# The package's own __init__ (the public names, imported lazily) and __main__ sit on top.
TOP = {"__init__", "__main__"}


def _modules():
    for folder, _, names in os.walk(PACKAGE):
        for name in sorted(names):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, PACKAGE)[:-3].split(os.sep)
                yield path, parts[0]


def _imports(path):
    """(subpackage or name imported from `fastlmdb`, line, at module level) of each import
    of fastlmdb in the file at `path`."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; write fastlmdb.X")
        if isinstance(node, ast.ImportFrom) and node.module == "fastlmdb":
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastlmdb."):
            targets = [node.module.split(".")[1]]
        elif isinstance(node, ast.Import):
            targets = [alias.name.split(".")[1] for alias in node.names
                       if alias.name.startswith("fastlmdb.")]
            targets += ["fastlmdb" for alias in node.names if alias.name == "fastlmdb"]
        else:
            continue
        for target in targets:
            yield target, node.lineno, id(node) in top_level


def _graph():
    """{subpackage: {subpackage it imports: first place}} of the whole package."""
    graph = collections.defaultdict(dict)
    for path, source in _modules():
        for target, line, _ in _imports(path):
            if target != source:
                graph[source].setdefault(target, f"{os.path.relpath(path, PACKAGE)}:{line}")
    return graph


def test_every_subpackage_has_a_floor():
    found = {source for _, source in _modules()} - TOP
    assert found == set(FLOORS), "give new subpackages a floor in FLOORS"


def test_imports_only_point_down():
    upward = []
    for source, targets in _graph().items():
        if source in TOP:
            continue
        for target, where in targets.items():
            if target not in FLOORS:  # a name from the package's __init__: the public facade
                upward.append(f"{where}: {source} imports {target!r} from fastlmdb itself")
            elif FLOORS[target] >= FLOORS[source]:
                upward.append(f"{where}: {source} (floor {FLOORS[source]}) imports {target} "
                              f"(floor {FLOORS[target]})")
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    graph = {source: set(targets) & set(FLOORS) for source, targets in _graph().items()
             if source not in TOP}
    done, visiting = set(), []

    def visit(node):
        if node in visiting:
            pytest.fail("import cycle: " + " -> ".join(visiting[visiting.index(node):] + [node]))
        if node in done:
            return
        visiting.append(node)
        for target in sorted(graph.get(node, ())):
            visit(target)
        visiting.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


def test_only_loading_imports_torch_at_import_time():
    """`import fastlmdb`, the converter, the tools and the CLI stay torch-free until a
    loading name is used (the CLI's demo imports it inside its function)."""
    eager = []
    for path, source in _modules():
        if source == "loading":
            continue
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        for node in tree.body:
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name == "torch" or name.startswith("torch.") for name in names):
                eager.append(f"{os.path.relpath(path, PACKAGE)}:{node.lineno}")
    assert not eager, eager
