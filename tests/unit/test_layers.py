"""The package layers read from the imports (docs/design.md, "Layout"), no Ray needed.

Layer 0 is the core (``trainer.core``, ``rewards``): no Ray and nothing above it. The weight
transports and the plain workers sit above it, the Ray shells above those, and the driver,
evaluation and CLI on top. Every import of a project module counts, also one inside a function.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("trainer", "services", "rewards", "configs")

#: Modules that sit on top: nothing below them may import them.
TOP = ("trainer.driver", "trainer.evaluate", "trainer.cli", "trainer.submit")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an import names (``a.b.c`` may name ``a.b``'s attribute ``c``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module, line) for every project import in ``path``, inside functions too."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            target = _resolve(name, modules)
            if target is not None:
                out.append((target, node.lineno))
    return out


def _third_party(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


MODULES = _modules()
GRAPH = {m: _imports(p, MODULES) for m, p in MODULES.items()}


def _is(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_import_graph_has_no_cycles():
    edges = {m: {t for t, _ in imps if t != m and not (m.startswith(t + ".") or t == m.rpartition(".")[0])}
             for m, imps in GRAPH.items()}  # fmt: skip
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t) :] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _is(m, "trainer.core", "rewards")))
def test_the_core_imports_no_ray_and_nothing_above_it(module):
    path = MODULES[module]
    assert "ray" not in _third_party(path), f"{module} imports Ray: the core must run without it"
    above = [(t, line) for t, line in GRAPH[module] if not _is(t, "trainer.core", "rewards", "configs")]
    assert not above, f"{module} (core) imports higher layers: {above}"


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if _is(m, "services", "trainer.transport", "trainer.learner"))
)
def test_services_transports_and_learner_never_import_the_top(module):
    wrong = [(t, line) for t, line in GRAPH[module] if _is(t, *TOP)]
    assert not wrong, f"{module} imports the driver / evaluation / CLI layer: {wrong}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _is(m, "trainer.transport", "trainer.demo")))
def test_transports_and_the_demo_fixture_import_no_ray_shell(module):
    wrong = [(t, line) for t, line in GRAPH[module] if _is(t, "services", "trainer.learner")]
    assert not wrong, f"{module} imports a pool or the learner: {wrong}"


def test_the_checker_sees_a_layer_violation(tmp_path):
    """The graph reader finds a function-level import of a higher layer (so the tests above can fail)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from trainer.driver import Trainer\n    import ray\n")
    assert ("trainer.driver", 2) in _imports(bad, MODULES)
    assert "ray" in _third_party(bad)


def _tracked_text_files() -> list[Path]:
    suffixes = {".py", ".yaml", ".yml", ".jinja", ".sh", ".toml", ".md"}
    roots = [REPO / d for d in (*PACKAGES, "tests", "bench", "scripts", "deploy", "docker", "docs")]
    files = [
        p for r in roots if r.is_dir() for p in r.rglob("*") if p.suffix in suffixes or p.name.startswith("Docker")
    ]
    return [p for p in files if ".venv" not in p.parts and "__pycache__" not in p.parts]


def test_every_docs_reference_resolves_inside_the_repository():
    """Comments point into docs/; a reference to a file outside the repository cannot be followed."""
    missing, outside = [], []
    for path in [*_tracked_text_files(), REPO / "README.md", REPO / "Makefile"]:
        text = path.read_text(errors="replace")
        for m in re.finditer(r"(?<![\w/.-])docs/([\w./-]+\.md)", text):
            if not (REPO / "docs" / m.group(1)).is_file():
                missing.append(f"{path.relative_to(REPO)}: docs/{m.group(1)}")
        for m in re.finditer(r"(?<![\w/-])(\.\./shared/|DESIGN\.md|PAPO\.md|CPU-STACK\.md|DEMO-CALIBRATION\.md)", text):
            outside.append(f"{path.relative_to(REPO)}: {m.group(1)}")
    assert not missing, f"references to docs that do not exist: {missing}"
    assert not outside, f"references outside the repository: {outside}"


def test_the_public_api_keeps_its_documented_paths():
    """docs/design.md's public API: the contract paths name the core's functions, not copies."""
    import services.corruption
    import trainer.algos
    from trainer.core import algos, corruption

    assert services.corruption.patch_blackening is corruption.patch_blackening
    assert (trainer.algos.papo_loss, trainer.algos.kl_penalty, trainer.algos.group_advantages) == (
        algos.papo_loss,
        algos.kl_penalty,
        algos.group_advantages,
    )
