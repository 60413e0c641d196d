"""The package's layout, as rules: only ``intake/`` and ``cli/`` talk to NATS;
the pure packages import without it; every public module declares a true ``__all__``; the
subpackages' implementation modules are private.

The import rules are read from the source (every ``import nats...`` at any nesting, so a
function-level import cannot slip through) and checked at run time in a fresh interpreter
(what a module pulls in through other modules counts too).
"""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

import bus_guard

PACKAGE = Path(bus_guard.__file__).resolve().parent

# The packages whose job is NATS I/O: the intake (the gateway) and the command-line tools,
# the web console (`bus-guard console`, cli/console/) among them.
NATS_PACKAGES = ("intake", "cli")

# Imports of nats outside NATS_PACKAGES that are allowed, as (subpackage or top-level module
# of bus_guard, enclosing function) -> why. Each must be inside a function (never module
# level), and each must still exist: a stale entry fails too.
# Function-level imports of nats outside intake/ and cli/ that are allowed, with why: none.
ALLOWED_NATS_IMPORTS: dict[tuple[str, str], str] = {}


class NatsImport(NamedTuple):
    file: str  # relative to the repository root, e.g. bus_guard/verify/_verifier.py
    line: int
    function: str | None  # the innermost enclosing function; None at module level
    module: str  # the nats module imported


def _is_nats(module: str | None) -> bool:
    return module is not None and (module == "nats" or module.startswith("nats."))


def _nats_imports(tree: ast.AST, file: str) -> Iterator[NatsImport]:
    """Every import of nats in *tree*, at any depth (functions, ``if TYPE_CHECKING``, ...)."""

    def visit(node: ast.AST, function: str | None) -> Iterator[NatsImport]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if _is_nats(alias.name):
                        yield NatsImport(file, child.lineno, function, alias.name)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and _is_nats(child.module):
                yield NatsImport(file, child.lineno, function, child.module or "")
            inner = (
                child.name
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
                else function
            )
            yield from visit(child, inner)

    yield from visit(tree, None)


def _all_nats_imports() -> list[NatsImport]:
    found: list[NatsImport] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        file = path.relative_to(PACKAGE.parent).as_posix()
        found.extend(_nats_imports(ast.parse(path.read_text(), filename=file), file))
    return found


def _home(file: str) -> str:
    """The subpackage or top-level module a file belongs to: ``bus_guard/verify/_verifier.py``
    -> ``verify``, ``bus_guard/pipeline.py`` -> ``pipeline``."""
    parts = Path(file).parts
    return parts[1] if len(parts) > 2 else Path(parts[1]).stem


def test_the_ast_walk_sees_imports_at_every_depth() -> None:
    source = """
import os, nats
from nats.js import api
from natsort import natsorted
from . import nats
if TYPE_CHECKING:
    import nats.aio.client as client
async def f():
    class C:
        def g(self):
            from nats.js.errors import Error
"""
    found = list(_nats_imports(ast.parse(source), "bus_guard/x.py"))
    assert [(i.line, i.function, i.module) for i in found] == [
        (2, None, "nats"),
        (3, None, "nats.js"),
        (7, None, "nats.aio.client"),
        (11, "g", "nats.js.errors"),
    ]


def test_only_intake_and_cli_import_nats() -> None:
    found = _all_nats_imports()
    outside = [i for i in found if _home(i.file) not in NATS_PACKAGES]
    unexpected = [i for i in outside if (_home(i.file), i.function) not in ALLOWED_NATS_IMPORTS]
    assert unexpected == [], "NATS I/O belongs in bus_guard/intake or bus_guard/cli"
    assert {(_home(i.file), i.function) for i in outside} == set(ALLOWED_NATS_IMPORTS), (
        "an allowed exception no longer exists: remove it from ALLOWED_NATS_IMPORTS"
    )
    assert all(i.function is not None for i in outside), "allowed imports are function-level"
    # The walk is not vacuous: the intake is where NATS is imported.
    assert "intake" in {_home(i.file) for i in found if i.function is None}


def _loaded_after_import(module: str) -> set[str]:
    """The top-level names in ``sys.modules`` after importing *module* in a fresh interpreter."""
    probe = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return set(json.loads(out))


PURE_MODULES = (
    "bus_guard",
    "bus_guard.decision",
    "bus_guard.errors",
    "bus_guard.intent",
    "bus_guard.ledger",
    "bus_guard.pipeline",
    "bus_guard.policy",
    "bus_guard.server",
    "bus_guard.settings",
    "bus_guard.signing",
    "bus_guard.verify",
)


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_modules_load_no_nats(module: str) -> None:
    loaded = _loaded_after_import(module)
    assert module in loaded
    assert sorted(m for m in loaded if _is_nats(m)) == []


def test_intake_loads_nats() -> None:
    # The probe's control: it does see nats when a module pulls it in.
    assert "nats" in _loaded_after_import("bus_guard.intake")


def test_verify_loads_what_an_executor_needs_only() -> None:
    # bus_guard.verify's promise: no NATS client, YAML or pydantic, and (bus_guard's lazy
    # names) not the policy compiler either.
    loaded = _loaded_after_import("bus_guard.verify")
    heavy = {"nats", "yaml", "pydantic", "anyio", "bus_guard.policy", "bus_guard.pipeline"}
    assert sorted(loaded & heavy) == []


def test_importing_bus_guard_imports_no_submodule() -> None:
    # Its names are lazy: `import bus_guard.verify` must not compile policies on the way.
    assert sorted(m for m in _loaded_after_import("bus_guard") if m.startswith("bus_guard.")) == []


# --- the declared surface ----------------------------------------------------------------


def _modules() -> list[str]:
    """Every module and package in bus_guard, imported or not (private ones included)."""
    names = [bus_guard.__name__]
    names += [m.name for m in pkgutil.walk_packages(bus_guard.__path__, f"{bus_guard.__name__}.")]
    return names


def _is_public(module: str) -> bool:
    return not any(part.startswith("_") for part in module.split("."))


PUBLIC_MODULES = [m for m in _modules() if _is_public(m)]


def test_the_walk_finds_subpackages_and_private_modules() -> None:
    modules = _modules()
    for name in ("bus_guard.policy", "bus_guard.intake", "bus_guard.pipeline"):
        assert name in PUBLIC_MODULES
    assert "bus_guard.policy._evaluator" in modules
    assert "bus_guard.policy._evaluator" not in PUBLIC_MODULES
    assert "bus_guard.__main__" not in PUBLIC_MODULES  # importing it would run the CLI


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_every_public_module_declares_a_true_all(module: str) -> None:
    mod = importlib.import_module(module)
    exported = getattr(mod, "__all__", None)
    assert isinstance(exported, tuple), f"{module}.__all__ must be a tuple"
    assert len(set(exported)) == len(exported), f"{module}.__all__ repeats a name"
    for name in exported:
        assert isinstance(name, str)
        assert hasattr(mod, name), f"{module}.__all__ names missing {name!r}"


def test_subpackage_implementation_modules_are_private() -> None:
    """A subpackage's surface is its ``__init__``'s ``__all__``; what implements it lives in
    ``_``-prefixed modules, so ``from bus_guard.policy._evaluator import ...`` says it
    reaches past the surface. Nested subpackages follow the same rule."""
    subpackages = {
        m.name for m in pkgutil.walk_packages(bus_guard.__path__, "bus_guard.") if m.ispkg
    }
    assert "bus_guard.policy" in subpackages
    public_inside = [
        m for m in PUBLIC_MODULES if m.rsplit(".", 1)[0] in subpackages and m not in subpackages
    ]
    assert public_inside == [], "modules inside a subpackage are private: prefix them with _"


# The embedding API (decide, evaluate, load_policies), the decision values and the error
# tree; the rest is reached through the subpackages. Raise with care.
MAX_TOP_LEVEL_NAMES = 20


def test_top_level_surface_is_small_and_lazy() -> None:
    assert len(bus_guard.__all__) <= MAX_TOP_LEVEL_NAMES
    for name in bus_guard.__all__:
        if name == "__version__":
            continue
        value = getattr(bus_guard, name)
        home = importlib.import_module(value.__module__)
        assert getattr(home, name) is value, f"bus_guard.{name} is not {value.__module__}.{name}"
