"""Packaging promises: `import sam_edu` imports no framework; profiles."""

import subprocess
import sys

import pytest

import sam_edu

FRAMEWORKS = ("torch", "jax", "tensorflow", "keras", "optax")


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split()) & set(FRAMEWORKS)


@pytest.mark.parametrize("module", ["sam_edu", "sam_edu.reference", "sam_edu.exercises.ch02"])
def test_core_imports_no_framework(module):
    assert _imported_after(f"import {module}") == set()


@pytest.mark.parametrize("module,framework", [
    ("sam_edu.torch", "torch"),
    ("sam_edu.jax", "jax, optax"),
    ("sam_edu.tf", "tensorflow, keras"),
])
def test_framework_subpackage_imports_only_its_framework(module, framework):
    pytest.importorskip(module)
    # what the framework drags in by itself is its business (TF 2.21 imports jax when present)
    assert _imported_after(f"import {module}") <= _imported_after(f"import {framework}")


def test_profile_defaults_to_quick(monkeypatch):
    monkeypatch.delenv("SAM_EDU_PROFILE", raising=False)
    assert sam_edu.profile() == "quick"
    assert sam_edu.pick(quick=1, full=2) == 1


def test_full_profile(monkeypatch):
    monkeypatch.setenv("SAM_EDU_PROFILE", "FULL")
    assert sam_edu.pick(quick=1, full=2) == 2


def test_unknown_profile_is_an_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("SAM_EDU_PROFILE", "fast")
    with pytest.raises(ValueError, match="SAM_EDU_PROFILE"):
        sam_edu.profile()
