"""Every property test in the suite is load-proof (issue 11, "CI that never flakes under load").

A Hypothesis test is load-proof when nothing in its verdict depends on wall time: no
per-example deadline and no ``too_slow`` health check. This walks every test module and
checks the settings each ``@given`` test actually runs with, so a new test that sets
``deadline=200`` or drops the suppression fails here rather than on a busy CI machine.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent


def _test_modules() -> list[str]:
    names = []
    for path in sorted(TESTS.rglob("test_*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        names.append(".".join(rel.parts))
    return names


def _given_tests(module: ModuleType) -> list[tuple[str, Any]]:
    found = []
    for name, obj in vars(module).items():
        candidates = [obj]
        if inspect.isclass(obj):
            candidates = list(vars(obj).values())
        for fn in candidates:
            inner = getattr(fn, "hypothesis", None)
            if inner is not None and hasattr(fn, "_hypothesis_internal_use_settings"):
                found.append((f"{module.__name__}.{getattr(fn, '__name__', name)}", fn))
    return found


def _import(mod_name: str) -> ModuleType:
    # Test modules import their tier's conftest as a top-level ``conftest`` (pytest's
    # prepend mode puts the tier's folder on sys.path); give each the one it expects.
    tier = ROOT.joinpath(*mod_name.split(".")[:-1])
    conftest = tier / "conftest.py"
    if conftest.exists():
        spec = importlib.util.spec_from_file_location(f"_conftest_{tier.name}", conftest)
        assert spec is not None and spec.loader is not None
        if spec.name not in sys.modules:
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = loaded
            sys.path.insert(0, str(tier))
            try:
                spec.loader.exec_module(loaded)
            finally:
                sys.path.remove(str(tier))
        saved = sys.modules.get("conftest")
        sys.modules["conftest"] = sys.modules[spec.name]
        sys.path.insert(0, str(tier))  # sibling helpers (e.g. integration/hostile.py)
        try:
            return importlib.import_module(mod_name)
        finally:
            sys.path.remove(str(tier))
            if saved is not None:
                sys.modules["conftest"] = saved
    return importlib.import_module(mod_name)


def _all_given_tests() -> list[tuple[str, Any]]:
    out = []
    for mod_name in _test_modules():
        try:
            module = _import(mod_name)
        except ImportError as exc:  # e.g. a TensorFlow-only module on a machine without it
            if "tensorflow" in str(exc).lower():
                continue
            raise
        out.extend(_given_tests(module))
    return out


GIVEN_TESTS = _all_given_tests()


def test_the_suite_has_property_tests() -> None:
    # Guards the walk itself: if discovery broke, the parametrised check below would pass vacuously.
    assert len(GIVEN_TESTS) >= 30, [name for name, _ in GIVEN_TESTS]


@pytest.mark.parametrize("name,fn", GIVEN_TESTS, ids=[name for name, _ in GIVEN_TESTS])
def test_property_test_is_load_proof(name: str, fn: Any) -> None:
    effective = fn._hypothesis_internal_use_settings
    assert effective.deadline is None, f"{name}: deadline={effective.deadline} fails under load"
    assert HealthCheck.too_slow in effective.suppress_health_check, f"{name}: too_slow health check is on"
