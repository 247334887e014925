"""The architecture's import rules, read from the source (every import, those inside
functions too): the producer side never reaches the sender or the shipper, the
protocol encoder stays pure, storage knows no HTTP, and the library knows no CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "kmagent"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_nodes(tree: ast.AST):
    """Every node, but those under ``if TYPE_CHECKING:`` (annotations, not imports)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                todo.extend(child.orelse)
                continue
            todo.append(child)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports at run time, relative imports made absolute."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            found.add(prefix)
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    return found


MODULES = {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def importers_of(forbidden: tuple[str, ...], among: list[str]) -> dict[str, list[str]]:
    bad = {}
    for name in among:
        hits = sorted(i for i in MODULES[name]
                      if any(i == f or i.startswith(f + ".") for f in forbidden))
        if hits:
            bad[name] = hits
    return bad


def test_storage_knows_no_http_and_no_shipper():
    storage = [m for m in MODULES if m.startswith("kmagent.spool")]
    assert importers_of(("requests", "urllib3", "http", "kmagent.sender", "kmagent.shipper",
                         "kmagent.daemon", "kmagent.config"), storage) == {}


def test_the_protocol_encoder_is_pure():
    allowed = {"__future__", "typing", "urllib.parse", "kmagent.events", "kmagent.memo",
               "kmagent.errors"}
    found = {i for i in MODULES["kmagent.protocol"]
             if not any(i == a or i.startswith(a + ".") for a in allowed)}
    assert found == set()


def test_the_library_knows_no_cli():
    library = [m for m in MODULES if not m.startswith(("kmagent.cli", "kmagent.__main__"))]
    assert importers_of(("click", "kmagent.cli"),
                        library) == {}


@pytest.mark.parametrize("entry", ["kmagent", "kmagent.client", "kmagent.web",
                                   "kmagent.compat.kissmetrics"])
def test_the_producer_side_never_reaches_the_sender_or_the_shipper(entry):
    # At run time, with everything these import: recording must stay light.
    code = (f"import sys, {entry}\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('requests', 'urllib3', 'watchdog', 'click', 'asyncio') or m in ('kmagent.sender', "
            "'kmagent.shipper', 'kmagent.daemon', 'kmagent.gate', 'http.client')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=PACKAGE.parent, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
