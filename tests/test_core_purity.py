"""corsproxy.core is pure: every module in it imports without aiohttp, lmdb, yaml or gunicorn.

Each module is imported in a fresh interpreter and ``sys.modules`` is checked afterwards, so an import that reaches a
forbidden package through any chain of other modules (transitively) is caught, not just a direct ``import`` line.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import corsproxy.core

FORBIDDEN = ("aiohttp", "lmdb", "yaml", "gunicorn")
CORE_MODULES = sorted(
    info.name for info in pkgutil.walk_packages(corsproxy.core.__path__, prefix="corsproxy.core.") if not info.ispkg
)


def _forbidden_after_import(module: str) -> list[str]:
    code = (
        f"import sys, importlib; importlib.import_module({module!r}); "
        f"print(' '.join(sorted(m for m in {FORBIDDEN!r} if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.split()


def test_the_walk_finds_the_core_modules() -> None:
    # Guards the walk itself: an empty list would make the parametrized test below pass vacuously.
    assert {"corsproxy.core.decision", "corsproxy.core.origin", "corsproxy.core.settings"} <= set(CORE_MODULES)


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_imports_no_io_package(module: str) -> None:
    assert _forbidden_after_import(module) == []


def test_the_check_sees_a_transitive_import() -> None:
    # The same probe on a module known to reach aiohttp through another module: it must report it.
    assert "aiohttp" in _forbidden_after_import("corsproxy.ops.admin")
