"""The exercise checks fail on the untouched stubs, pass on the solutions, and catch real mistakes."""

from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from sam_edu import reference as ref
from sam_edu.exercises import ch02

ROOT = Path(__file__).resolve().parents[1]
EXERCISES = sorted((ROOT / "exercises").glob("*.ipynb"))


def _run(path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, allow_errors=True,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def _check_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code" and "check_" in c.source
            and "import" not in c.source]


def test_every_exercise_has_a_solution():
    assert EXERCISES, "no exercise notebooks found"
    for path in EXERCISES:
        assert (ROOT / "exercises" / "solutions" / path.name).exists(), path.name


@pytest.mark.parametrize("path", EXERCISES, ids=lambda p: p.stem)
def test_checks_fail_on_the_untouched_stubs(path):
    cells = _check_cells(_run(path))
    assert cells, "an exercise notebook must have check cells"
    for cell in cells:
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert errors, f"check cell passed on a stub:\n{cell.source}"


@pytest.mark.parametrize("path", EXERCISES, ids=lambda p: p.stem)
def test_checks_pass_on_the_solutions(path):
    nb = _run(ROOT / "exercises" / "solutions" / path.name)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, errors
    assert len(_check_cells(nb)) == len(_check_cells(nbformat.read(path, as_version=4)))


def _norm(tree):
    return np.sqrt(sum(np.sum(t * t) for t in tree))


MISTAKES = {
    "per-tensor norm": lambda g, rho, eps=1e-12: [rho * t / np.linalg.norm(t) for t in g],
    "no epsilon (NaN at zero)": lambda g, rho, eps=1e-12: [rho * t / _norm(g) for t in g],
    "missing rho": lambda g, rho, eps=1e-12: [t / (_norm(g) + eps) for t in g],
}


@pytest.mark.parametrize("name", MISTAKES)
def test_perturbation_check_catches_mistakes(name):
    with np.errstate(all="ignore"), pytest.raises(AssertionError):
        ch02.check_sam_perturbation(MISTAKES[name])


def _step_at_w(params, grad_fn, lr, rho):  # forgets to take the gradient at w + e
    return [w - lr * g for w, g in zip(params, grad_fn(params))]


def _step_in_place(params, grad_fn, lr, rho):  # correct numbers, but overwrites the input
    g_adv = grad_fn(ref.ascend(params, ref.sam_perturbation(grad_fn(params), rho)))
    for w, d in zip(params, g_adv):
        w -= lr * d
    return params


@pytest.mark.parametrize("mistake", [_step_at_w, _step_in_place], ids=lambda f: f.__name__)
def test_step_check_catches_mistakes(mistake):
    with pytest.raises(AssertionError):
        ch02.check_sam_step(mistake)
