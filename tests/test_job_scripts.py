"""Every ``from msnoop... import name`` in the benchmark and job scripts under ``jobs/`` resolves.

The scripts import lazily inside functions and only run when someone benchmarks, so a module moved or
renamed in the package (``msnoop.config`` -> ``msnoop.io.config``) would otherwise surface as an
ImportError halfway through an hour-long benchmark.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def msnoop_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """``(line, module, name)`` of every msnoop import in a file, at any depth (``name`` None for ``import m``)."""
    out: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.split(".")[0] == "msnoop"
        ):
            out += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "msnoop"]
    return out


@pytest.mark.parametrize("script", sorted(JOBS.glob("*.py")), ids=lambda p: p.name)
def test_msnoop_imports_of_a_job_script_resolve(script: Path) -> None:
    missing = []
    for line, module, name in msnoop_imports(script):
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            missing.append(f"{script.name}:{line}: {module} ({exc})")
            continue
        if name is not None and name != "*" and not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{script.name}:{line}: {module} has no {name}")
    assert not missing, "\n".join(missing)


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    f = tmp_path / "s.py"
    f.write_text("def main():\n    from msnoop.config import InputConfig\n    import msnoop.runtime\n")
    assert msnoop_imports(f) == [(2, "msnoop.config", "InputConfig"), (3, "msnoop.runtime", None)]
