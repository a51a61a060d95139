"""Layer boundaries (docs/design.md §2.3), checked by importing in fresh interpreters and by reading the AST.

* ``protocol`` is sans-IO: importing any of its modules loads no trio, libp2p, TensorFlow or Keras,
  and its source imports only the stdlib, msgpack, cryptography, numpy and itself;
* ``peerd.ctl.main`` (peerctl) stays light: no libp2p, trio, numpy, TensorFlow or executor;
* exactly one file under ``peerd/`` imports libp2p: ``peerd/p2p.py``;
* no file of the installed distribution (``peerd/``, ``protocol/``) outside ``peerd/executor/``
  imports TensorFlow or Keras. Stand-alone tools in ``scripts/`` (e.g. ``prepare_data.py``, which
  builds the demo's Keras model offline) run in their own process and are not part of it.

The source checks walk the AST (import statements and ``importlib.import_module("…")`` /
``__import__("…")`` calls with a literal name), so a comment or a string mentioning a module
does not count, and an import hidden inside a function does.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {
    ".venv",
    "venv",
    ".git",
    "__pycache__",
    "build",
    "dist",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
}


def python_files(top: Path) -> Iterator[Path]:
    for path in sorted(top.rglob("*.py")):
        if not SKIP_DIRS.intersection(path.relative_to(ROOT).parts):
            yield path


def imported_modules(path: Path) -> set[str]:
    """Top-level-qualified names of every module ``path`` imports (absolute imports only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = (
                func.attr
                if isinstance(func, ast.Attribute)
                else func.id
                if isinstance(func, ast.Name)
                else ""
            )
            arg = node.args[0]
            if (
                called in ("import_module", "__import__")
                and isinstance(arg, ast.Constant)
                and isinstance(arg.value, str)
            ):
                names.add(arg.value)
    return names


def imports_any(path: Path, roots: set[str]) -> bool:
    return any(name.split(".")[0] in roots for name in imported_modules(path))


def loaded_after_import(modules: list[str]) -> list[str]:
    """sys.modules after importing ``modules`` in a fresh interpreter (no site customisation of ours)."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout.strip().splitlines()[-1]))


def _tops(modules: list[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def protocol_modules() -> list[str]:
    mods = []
    for path in python_files(ROOT / "protocol"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods.append(".".join(parts))
    return mods


# --- the checker itself --------------------------------------------------------------------


def test_import_scanner(tmp_path: Path) -> None:
    src = tmp_path / "x.py"
    src.write_text(
        "import os.path\nfrom libp2p.peer import id\nimport importlib\n"
        "def f():\n    import tensorflow as tf\n    importlib.import_module('keras.layers')\n"
        "from . import sibling\n# import trio\ns = 'import numpy'\n",
        encoding="utf-8",
    )
    assert imported_modules(src) == {"os.path", "libp2p.peer", "importlib", "tensorflow", "keras.layers"}
    assert imports_any(src, {"libp2p"}) and not imports_any(src, {"trio", "numpy"})


# --- protocol ----------------------------------------------------------------------------------


def test_protocol_imports_nothing_heavy_at_runtime() -> None:
    mods = protocol_modules()
    assert "protocol.envelope" in mods and "protocol.fuzz" in mods
    loaded = _tops(loaded_after_import(mods))
    assert not loaded & {"trio", "libp2p", "tensorflow", "keras", "peerd"}, loaded & {
        "trio",
        "libp2p",
        "tensorflow",
        "keras",
        "peerd",
    }


def test_protocol_source_imports_only_allowed_packages() -> None:
    allowed = set(sys.stdlib_module_names) | {"msgpack", "cryptography", "numpy", "protocol", "__future__"}
    bad = {}
    for path in python_files(ROOT / "protocol"):
        extra = {m for m in imported_modules(path) if m.split(".")[0] not in allowed}
        if extra:
            bad[str(path.relative_to(ROOT))] = sorted(extra)
    assert not bad, f"protocol/ must stay sans-IO (stdlib, msgpack, cryptography, numpy): {bad}"


# --- peerd -------------------------------------------------------------------------------------


def test_peerctl_stays_light() -> None:
    if not (ROOT / "peerd" / "ctl" / "main.py").exists():
        pytest.skip("peerd/ctl/main.py does not exist yet")
    loaded = loaded_after_import(["peerd.ctl.main"])
    tops = _tops(loaded)
    assert not tops & {"libp2p", "trio", "numpy", "tensorflow", "keras"}, tops & {"libp2p", "trio", "numpy"}
    assert not [m for m in loaded if m == "peerd.executor" or m.startswith("peerd.executor.")]


def test_only_p2p_imports_libp2p() -> None:
    importers = sorted(
        str(p.relative_to(ROOT)) for p in python_files(ROOT / "peerd") if imports_any(p, {"libp2p"})
    )
    assert importers == ["peerd/p2p.py"]


def test_only_the_executor_imports_tensorflow() -> None:
    offenders = []
    for top in ("peerd", "protocol"):  # the packages pyproject.toml installs
        for path in python_files(ROOT / top):
            if (ROOT / "peerd" / "executor") in path.parents:
                continue
            if imports_any(path, {"tensorflow", "keras", "tf_keras"}):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"only peerd/executor/ may import TensorFlow/Keras: {offenders}"
