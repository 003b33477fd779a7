"""Dependencies inside parley.client run one way: no import cycles, and the SDK never imports the
command line (`parley.client.cli`) or what only the command line needs (typer, rich,
prompt_toolkit, and OpenTelemetry's SDK and exporters: the SDK uses OpenTelemetry's API only).

The graph is read from the source with `ast`: every `import` a module writes, inside functions
and `if TYPE_CHECKING:` blocks too (a cycle hidden there is still a cycle of the design).
Importing a submodule also runs its package's `__init__` first; those implicit edges are left
out, or every package that re-exports its own submodules would count as a cycle.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "parley.client"
CLI = "parley.client.cli"
# What only the command line may import: the `cli` extra's packages (and their modules).
CLI_ONLY = frozenset(
    {"typer", "rich", "prompt_toolkit", "opentelemetry.sdk", "opentelemetry.exporter"}
)
# What the command line loads only for `--trace`.
TRACE_ONLY = frozenset({"opentelemetry.sdk", "opentelemetry.exporter"})


def _within(name: str, packages: frozenset[str]) -> bool:
    return any(name == package or name.startswith(f"{package}.") for package in packages)


@dataclass
class ImportGraph:
    """The modules of one package, read from the source, and what each imports."""

    modules: dict[str, Path]
    internal: dict[str, set[str]] = field(default_factory=dict)
    """Module -> the modules of the package it imports."""
    external: dict[str, set[str]] = field(default_factory=dict)
    """Module -> the modules of other packages it imports (full dotted names)."""

    def cycles(self) -> list[list[str]]:
        """Each set of modules that import each other (directly or round a loop), sorted."""
        return sorted(
            sorted(component)
            for component in _components(self.internal)
            if len(component) > 1 or next(iter(component)) in self.internal[next(iter(component))]
        )


def _module_name(source: Path, path: Path) -> str:
    parts = list(path.relative_to(source).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_graph(source: Path, package: str) -> ImportGraph:
    """The import graph of `package`, whose files are under `source` (a src directory)."""
    root = source.joinpath(*package.split("."))
    modules = {_module_name(source, path): path for path in sorted(root.rglob("*.py"))}
    graph = ImportGraph(modules)
    for name, path in modules.items():
        internal = graph.internal.setdefault(name, set())
        external = graph.external.setdefault(name, set())
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for target in _imported(node, name, is_package, modules):
                if target in modules:
                    internal.add(target)
                else:
                    external.add(target)
    return graph


def _imported(node: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """The modules an import statement names: a submodule when `from X import y` names one,
    else X itself."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        origin = ".".join([*base, *([node.module] if node.module else [])])
    else:
        origin = node.module or ""
    found = []
    for alias in node.names:
        submodule = f"{origin}.{alias.name}"
        found.append(submodule if submodule in modules else origin)
    return found


def _components(edges: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components (Tarjan), iteratively: no recursion limit to meet."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(edges[successor]))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    found.append(component)
    return found


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return read_graph(SOURCE, PACKAGE)


def _in_cli(module: str) -> bool:
    return module == CLI or module.startswith(f"{CLI}.")


def test_the_graph_is_read_from_the_source(graph: ImportGraph) -> None:
    # What the other tests rely on: every module found, imports resolved to modules.
    assert {"parley.client", "parley.client.session", f"{CLI}.root"} <= graph.modules.keys()
    assert "parley.client.session" in graph.internal["parley.client.chat"]
    assert "grpc" in graph.external["parley.client.session"]
    assert "typer" in graph.external[f"{CLI}.root"]


def test_no_import_cycles_inside_parley_client(graph: ImportGraph) -> None:
    assert graph.cycles() == []


def test_the_cycle_check_finds_cycles(tmp_path: Path) -> None:
    # The same reading on a package made to have cycles: a TYPE_CHECKING one, a relative one
    # inside a function, and a module importing itself.
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from pkg.a import A\n")
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\nA = 1\n"
    )
    (package / "b.py").write_text("from pkg import a\nB = 2\n")
    (package / "c.py").write_text("def later():\n    from .d import D\n")
    (package / "d.py").write_text("from . import c\nD = 3\n")
    (package / "e.py").write_text("import pkg.e\n")
    found = read_graph(tmp_path, "pkg").cycles()
    assert found == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.d"], ["pkg.e"]]


def test_only_the_cli_imports_the_cli_and_its_extra(graph: ImportGraph) -> None:
    wrong = {
        module: sorted(
            {target for target in graph.internal[module] if _in_cli(target)}
            | {target for target in graph.external[module] if _within(target, CLI_ONLY)}
        )
        for module in graph.modules
        if not _in_cli(module)
    }
    assert {module: names for module, names in wrong.items() if names} == {}


def test_the_chat_commands_share_their_pieces_through_one_module(graph: ImportGraph) -> None:
    # `parley chat` starts the interactive chat; what both need is in chat_connection, so the
    # interactive chat never imports the command module back (nor does rooms).
    shared = f"{CLI}.chat_connection"
    assert shared in graph.internal[f"{CLI}.chat"] & graph.internal[f"{CLI}.interactive"]
    assert f"{CLI}.chat" not in graph.internal[f"{CLI}.interactive"] | graph.internal[shared]
    assert f"{CLI}.chat" not in graph.internal[f"{CLI}.rooms"]


_LOADED = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(
    name for name in sys.modules
    if any(name == p or name.startswith(p + ".") for p in [*sys.argv[2].split(","), sys.argv[3]])
)))
"""


def _loaded_by(module: str) -> list[str]:
    """The modules of the cli extra and of parley.client.cli that a fresh interpreter holds
    after importing `module` (the whole extra is installed here)."""
    done = subprocess.run(
        [sys.executable, "-c", _LOADED, module, ",".join(sorted(CLI_ONLY)), CLI],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    loaded: list[str] = json.loads(done.stdout)
    return loaded


_SDK_MODULES = sorted(name for name in read_graph(SOURCE, PACKAGE).modules if not _in_cli(name)) + [
    CLI
]


@pytest.mark.parametrize("module", _SDK_MODULES)
def test_importing_the_sdk_imports_nothing_of_the_cli(module: str) -> None:
    # parley.client.cli itself too: its `main` must run without the extra, to say so.
    expected = [CLI] if module == CLI else []
    assert _loaded_by(module) == expected


def test_the_import_check_sees_the_cli_extra() -> None:
    loaded = _loaded_by(f"{CLI}.root")
    assert {"typer", "rich"} <= set(loaded)
    assert f"{CLI}.root" in loaded
    # The commands start without OpenTelemetry's SDK: only --trace loads it.
    assert [name for name in loaded if _within(name, TRACE_ONLY)] == []
    assert "opentelemetry.sdk.trace" in _loaded_by(f"{CLI}.tracing")
