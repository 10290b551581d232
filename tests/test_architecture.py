"""The layering the package's folders promise, checked on every module's imports (function-level ones too):

    engine/   knows nothing of HTTP, queues or dialects: imports neither kleinserve.api nor kleinserve.jobs
    jobs/     knows no dialect: never imports kleinserve.api, never names one (not even in a comment);
              reaches the engine only through engine.protocol
    api/      reaches the engine only through engine.protocol (the Engine interface and the types it names)
    deploy.py is the only module that imports ray (an optional extra: `kleinserve[ray]`)

Data flows one way: dialect -> internal request -> job -> engine -> result -> dialect.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "kleinserve"
ENGINE_INTERFACE = "kleinserve.engine.protocol"
# Any case, as a word or inside an identifier (X-BFL-Signature, bfl_cost, OpenAIRoute).
DIALECT_NAMES = re.compile(r"bfl|openai|cloudflare|vercel", re.IGNORECASE)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_in(source: str, package: str, root: str = "kleinserve") -> set[str]:
    """Every name of package `root` imported by `source` (a module of `package`), as absolute dotted names:
    the modules, and `module.name` for each name imported from one (relative imports resolved)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name == root or name.startswith(root + ".")}


def imports_of(path: Path, root: str = "kleinserve") -> set[str]:
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    return imports_in(path.read_text(), package, root)


def _modules(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def _within(name: str, modules: set[str]) -> bool:
    return any(name == module or name.startswith(module + ".") for module in modules)


def _violations(folder: str, allowed: set[str], forbidden_prefixes: tuple[str, ...]) -> dict[str, list[str]]:
    """Per module of `folder`: the imports that name a forbidden package and are not in `allowed`. A name
    `pkg.module.attr` counts as its module."""
    found = {}
    for path in _modules(folder):
        bad = sorted(
            name
            for name in imports_of(path)
            if name.startswith(forbidden_prefixes)
            and not any(name == a or name.startswith(a + ".") for a in allowed)
        )
        if bad:
            found[str(path.relative_to(PACKAGE))] = bad
    return found


def test_engine_imports_neither_api_nor_jobs() -> None:
    assert _violations("engine", set(), ("kleinserve.api", "kleinserve.jobs")) == {}


def test_jobs_import_no_dialect_and_only_the_engine_interface() -> None:
    assert _violations("jobs", {ENGINE_INTERFACE}, ("kleinserve.api", "kleinserve.engine")) == {}


def test_jobs_name_no_dialect() -> None:
    named = {
        f"{path.relative_to(PACKAGE)}:{number}": line.strip()
        for path in _modules("jobs")
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if DIALECT_NAMES.search(line)
    }
    assert named == {}


def test_api_reaches_the_engine_only_through_its_interface() -> None:
    assert _violations("api", {ENGINE_INTERFACE}, ("kleinserve.engine",)) == {}


def test_only_deploy_imports_ray() -> None:
    # Ray is an optional extra: an import anywhere else would break every install without it.
    importers = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if imports_of(path, "ray")}
    assert importers == {"deploy.py"}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from kleinserve.engine.pipeline import Pipeline", "kleinserve.engine.pipeline"),
        ("import kleinserve.api.app", "kleinserve.api.app"),
        ("def f():\n    from kleinserve.jobs import store", "kleinserve.jobs.store"),
        ("from ..api import bfl", "kleinserve.api.bfl"),
        ("from . import events", "kleinserve.jobs.events"),
    ],
)
def test_imports_are_found_wherever_they_are(source: str, expected: str) -> None:
    # The check itself, on a module of kleinserve.jobs.
    assert expected in imports_in(source, "kleinserve.jobs")
    assert imports_in("import os\nfrom typing import Any", "kleinserve.jobs") == set()
