"""Checks for chapter 4, *GSAM: minimising the surrogate gap*."""

from __future__ import annotations

from collections.abc import Callable


from sam_edu import reference as ref
from sam_edu.exercises.ch02 import _close, _random_tree


def check_decompose(decompose: Callable) -> None:
    """``decompose(g, g_adv)`` must return ``(g_par, g_perp)`` with one global projection."""
    for seed in (0, 1):
        g, g_adv = _random_tree(seed), _random_tree(seed + 10)
        got = decompose(g, g_adv)
        want = ref.decompose(g, g_adv)
        if len(got) != 2:
            raise AssertionError("decompose must return two lists: (g_par, g_perp)")
        _close(got[0], want[0], "g_par (hint: project onto g_adv / ||g_adv|| over ALL tensors)")
        _close(got[1], want[1], "g_perp (hint: g_perp = g - g_par)")
    print("check_decompose: correct")


def check_gsam_direction(gsam_direction: Callable) -> None:
    """``gsam_direction(g, g_adv, alpha)`` must return ``g_adv - alpha * g_perp``."""
    for seed, alpha in [(2, 0.4), (3, 1.0), (4, 0.0)]:
        g, g_adv = _random_tree(seed), _random_tree(seed + 10)
        _close(gsam_direction(g, g_adv, alpha), ref.gsam_direction(g, g_adv, alpha),
               f"gsam_direction with alpha={alpha} (hint: minus alpha times the ORTHOGONAL part)")
    print("check_gsam_direction: correct")
