"""faiss_build(): exactly one faiss build (CPU or GPU) per environment, over every combination of distributions."""

from __future__ import annotations

import itertools
import logging
import sys
import types

import numpy as np
import pytest

from msnoop.evaluate import knn

CPU = ["faiss-cpu", "FAISS_CPU"]
GPU = ["faiss-gpu", "faiss-gpu-cu12", "faiss_gpu_cu11", "Faiss-GPU-CU12"]
OTHER = ["faiss-tools"]  # a name that starts with faiss but is no build of it


def _combinations() -> list[tuple[str, ...]]:
    names = CPU + GPU + OTHER
    return [c for r in range(len(names) + 1) for c in itertools.combinations(names, r)]


def _gpu_module(n_gpus: int) -> types.ModuleType:
    """A stand-in for a GPU build of the faiss module (this machine has faiss-cpu only)."""
    mod = types.ModuleType("faiss")
    mod.StandardGpuResources = object  # type: ignore[attr-defined]
    mod.get_num_gpus = lambda: n_gpus  # type: ignore[attr-defined]
    return mod


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(knn, "_gpu_warning_logged", False)
    knn._checked_faiss.cache_clear()
    yield
    knn._checked_faiss.cache_clear()


@pytest.mark.parametrize("dists", _combinations(), ids=lambda c: "+".join(c) or "none")
def test_faiss_build_over_distribution_sets(dists, caplog, monkeypatch) -> None:
    low = [d.lower().replace("_", "-") for d in dists]
    has_cpu = "faiss-cpu" in low
    has_gpu = sorted({d for d in low if d.startswith("faiss-gpu")})
    caplog.set_level(logging.WARNING, logger="msnoop.evaluate.knn")
    if has_cpu and has_gpu:
        with pytest.raises(ImportError) as err:
            knn.faiss_build(dists)
        msg = str(err.value)
        assert "faiss-cpu" in msg and all(g in msg for g in has_gpu)
        assert "pip uninstall faiss-cpu" in msg
        return
    if has_gpu:
        # the real module here is a CPU build: a GPU distribution over it is refused
        with pytest.raises(ImportError, match="has no GPU code"):
            knn.faiss_build(dists)
        monkeypatch.setitem(sys.modules, "faiss", _gpu_module(0))
        assert knn.faiss_build(dists) == "gpu"
        assert knn.faiss_build(dists) == "gpu"
        warnings = [r for r in caplog.records if "sees no GPU" in r.getMessage()]
        assert len(warnings) == 1 and has_gpu[0] in warnings[0].getMessage()  # once, however often asked
    else:
        # faiss-cpu, or no known distribution: the importable module (faiss-cpu here) decides
        assert knn.faiss_build(dists) == "cpu"
        assert not caplog.records
        if not has_cpu:
            monkeypatch.setitem(sys.modules, "faiss", _gpu_module(1))  # e.g. faiss built from source with CUDA
            assert knn.faiss_build(dists) == "gpu"
            assert not caplog.records


def test_gpu_build_with_gpus_or_without_counting_does_not_warn(monkeypatch, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="msnoop.evaluate.knn")
    monkeypatch.setitem(sys.modules, "faiss", _gpu_module(2))
    assert knn.faiss_build(["faiss-gpu-cu12"]) == "gpu"

    def no_driver() -> int:
        raise AssertionError("get_num_gpus() must not be called with count_gpus=False")

    mod = _gpu_module(0)
    mod.get_num_gpus = no_driver  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "faiss", mod)
    assert knn.faiss_build(["faiss-gpu-cu12"], count_gpus=False) == "gpu"
    assert not caplog.records


@pytest.mark.parametrize("dists", [(), ("numpy",), ("faiss-cpu",), ("faiss-gpu-cu12",)])
def test_no_faiss_module_names_the_extras(dists, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    with pytest.raises(ImportError, match=r"msnoop\[cpu\].*msnoop\[gpu\]"):
        knn.faiss_build(dists)


def test_real_environment_is_cpu() -> None:
    # the test environment is installed with the cpu extra only
    assert "faiss-cpu" in knn._installed_distributions()
    assert knn.faiss_build() == "cpu"


def test_search_refuses_a_mixed_install(monkeypatch) -> None:
    monkeypatch.setattr(knn, "_installed_distributions", lambda: ["faiss-cpu", "faiss-gpu-cu12", "numpy"])
    X = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    with pytest.raises(ImportError, match="faiss-cpu, faiss-gpu-cu12"):
        knn.knn_search(X, X, 2, index="exact")
    monkeypatch.setattr(knn, "_installed_distributions", lambda: ["faiss-cpu"])
    knn._checked_faiss.cache_clear()
    _, idx = knn.knn_search(X, X, 1, index="exact")
    np.testing.assert_array_equal(idx[:, 0], np.arange(10))
