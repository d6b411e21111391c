"""The chapter 6 checks catch typical bSAM and ECE mistakes (the popular port's among them)."""
import numpy as np
import pytest

from sam_edu import reference as ref
from sam_edu.exercises import ch06


def _sample_variance(params, s, noise, num_data):   # n / (N s): variance used as the std
    return [w + n / (num_data * si) for w, si, n in zip(params, s, noise)]


def _sample_no_n(params, s, noise, num_data):       # forgets N
    return [w + n / np.sqrt(si) for w, si, n in zip(params, s, noise)]


@pytest.mark.parametrize("mistake", [_sample_variance, _sample_no_n], ids=lambda f: f.__name__)
def test_posterior_sample_check_catches_mistakes(mistake):
    with pytest.raises(AssertionError):
        ch06.check_posterior_sample(mistake)


PRECISION_MISTAKES = {
    "squared variance term (popular port)": lambda s, g, b2, d, wd: [
        b2 * si + (1 - b2) * (si * gi ** 2 + d + wd) for si, gi in zip(s, g)],
    "no abs": lambda s, g, b2, d, wd: [
        b2 * si + (1 - b2) * (np.sqrt(si) * gi + d + wd) for si, gi in zip(s, g)],
    "no delta": lambda s, g, b2, d, wd: [
        b2 * si + (1 - b2) * (np.sqrt(si) * np.abs(gi) + d) for si, gi in zip(s, g)],
}


@pytest.mark.parametrize("name", PRECISION_MISTAKES)
def test_precision_check_catches_mistakes(name):
    with np.errstate(all="ignore"), pytest.raises(AssertionError):
        ch06.check_bsam_precision(PRECISION_MISTAKES[name])


def _step(noise_removed=True, precision_from="g", new_s_in_mean=False):
    def step(params, m, s, noise, grad_fn, num_data, lr, beta1, beta2, weight_decay, rho, damping):
        noisy = ref.posterior_sample(params, s, noise, num_data)
        g = grad_fn(noisy)
        start = params if noise_removed else noisy
        g_adv = grad_fn([w + e for w, e in zip(start, ref.bsam_perturbation(g, s, rho))])
        m = ref.bsam_momentum(m, g_adv, start, beta1, weight_decay)
        s_new = ref.bsam_precision(s, g if precision_from == "g" else g_adv, beta2, damping,
                                   weight_decay)
        return ref.bsam_mean(start, m, s_new if new_s_in_mean else s, lr), m, s_new
    return step


@pytest.mark.parametrize("kw", [dict(noise_removed=False), dict(precision_from="g_adv"),
                                dict(new_s_in_mean=True)], ids=str)
def test_step_check_catches_mistakes(kw):
    with pytest.raises(AssertionError):
        ch06.check_bsam_step(_step(**kw))
    ch06.check_bsam_step(_step())  # the correct composition passes


def _ece_unweighted(probs, labels, n_bins=15):
    conf, correct = probs.max(1), probs.argmax(1) == labels
    b = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    return np.mean([abs(correct[b == k].mean() - conf[b == k].mean()) for k in np.unique(b)])


def _ece_signed(probs, labels, n_bins=15):
    conf, correct = probs.max(1), probs.argmax(1) == labels
    b = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    return abs(sum(np.mean(b == k) * (correct[b == k].mean() - conf[b == k].mean())
                   for k in np.unique(b)))


def _ece_floor_bins(probs, labels, n_bins=15):   # floor(c M): c = 1 falls out of the last bin
    conf, correct = probs.max(1), probs.argmax(1) == labels
    b = np.floor(conf * n_bins).astype(int)
    return sum(np.mean(b == k) * abs(correct[b == k].mean() - conf[b == k].mean())
               for k in range(n_bins) if np.any(b == k))


@pytest.mark.parametrize("mistake", [_ece_unweighted, _ece_signed, _ece_floor_bins],
                         ids=lambda f: f.__name__)
def test_ece_check_catches_mistakes(mistake):
    with pytest.raises(AssertionError):
        ch06.check_expected_calibration_error(mistake)
