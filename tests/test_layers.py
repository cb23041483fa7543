"""The package's one-way design: a lower layer never imports a higher one, and no two packages import each other.

Data flows read -> preprocess -> models -> (segment) -> embed -> aggregate -> correct -> store -> query, on
the foundations (core: the output folder, parts, tables, storage; vectors: post-processing and distances); training,
screens and evaluation sit on top of the stages; the job registry, the Python API and job submission on top of
those; the CLI last. Every ``import msnoop.X`` / ``from msnoop.X import`` in the package (at module level or
inside a function: a lazy import is still a dependency) is checked against this order.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "msnoop"

#: Layers from the bottom up; the units of one layer may import each other, but not in a cycle.
LAYERS: list[tuple[str, ...]] = [
    ("core",),
    ("vectors",),
    ("io",),
    ("preprocess",),
    ("models",),
    ("segment",),
    ("embed",),
    ("aggregate",),
    ("correct",),
    ("store",),
    ("query",),
    ("train", "screen", "evaluate", "data"),
    ("job_kinds", "api", "submit", "demo"),
    ("cli", "__main__", "__init__"),
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def _unit(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("").parts
    return rel[0]


def _imports(path: Path) -> set[str]:
    """First-level msnoop units that ``path`` imports (``msnoop.embed.pipeline`` -> ``embed``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "msnoop" else [])
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "msnoop" and len(parts) > 1:
                out.add(parts[1])
    return out


def _edges() -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        src = _unit(path)
        for dst in _imports(path):
            if dst != src:
                edges.setdefault((src, dst), []).append(str(path.relative_to(PACKAGE.parent)))
    return edges


def test_every_unit_of_the_package_has_a_layer():
    units = {_unit(p) for p in PACKAGE.rglob("*.py")}
    assert units - set(RANK) == set(), "add new packages/modules to LAYERS in tests/test_layers.py"


def test_no_lower_layer_imports_a_higher_one():
    upward = [
        f"{src} (layer {RANK[src]}) imports {dst} (layer {RANK[dst]}) in {', '.join(files)}"
        for (src, dst), files in _edges().items()
        if RANK.get(dst, -1) > RANK.get(src, -1)
    ]
    assert upward == []


def test_no_two_units_import_each_other():
    edges = _edges()
    cycles = sorted({tuple(sorted(pair)) for pair in edges if (pair[1], pair[0]) in edges})
    assert cycles == []


@pytest.mark.parametrize(
    "unit, rank_above",
    [("core", "io"), ("embed", "store"), ("correct", "evaluate"), ("store", "query"), ("query", "job_kinds")],
)
def test_the_check_sees_an_upward_import(tmp_path, unit, rank_above):
    """The checker itself: a synthetic upward import in a lower unit is reported (the test can fail)."""
    mod = tmp_path / "m.py"
    mod.write_text(f"def f():\n    from msnoop.{rank_above}.x import y\n")
    assert _imports(mod) == {rank_above}
    assert RANK[rank_above] > RANK[unit]


def test_importing_the_cli_loads_no_stage():
    """``msnoop --help`` stays fast: the CLI imports typer and config models, not scipy, scikit-image, torch or Ray."""
    code = (
        "import sys, msnoop.cli; "
        "heavy = [m for m in ('scipy', 'skimage', 'torch', 'ray', 'lancedb', 'sklearn', 'pandas') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == ""
