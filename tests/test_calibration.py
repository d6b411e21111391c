"""sam_edu.calibration: ECE and reliability bins against answers computed by hand."""

import numpy as np
import pytest

from sam_edu.calibration import bin_index, expected_calibration_error, reliability_bins


def _predictions(confidence, correct, n_classes=10):
    """Rows with max probability ``confidence`` on class 0 (the rest spread evenly); the label is 0
    where ``correct`` and 1 otherwise."""
    confidence = np.asarray(confidence, dtype=float)
    probs = np.repeat(((1 - confidence) / (n_classes - 1))[:, None], n_classes, axis=1)
    probs[:, 0] = confidence
    return probs, np.where(correct, 0, 1)


def test_a_calibrated_predictor_built_exactly_has_zero_ece():
    # in each group a fraction c of the inputs predicted with confidence c is correct
    groups = [(0.35, 20), (0.6, 40), (0.75, 80), (0.95, 100)]
    confidence = np.concatenate([np.full(n, c) for c, n in groups])
    correct = np.concatenate([np.arange(n) < round(c * n) for c, n in groups])
    probs, labels = _predictions(confidence, correct)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_a_calibrated_predictor_sampled_has_ece_near_zero():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.1, 1.0, 200_000)
    probs, labels = _predictions(confidence, rng.random(confidence.size) < confidence)
    assert expected_calibration_error(probs, labels) < 0.005


def test_an_overconfident_predictor_has_the_ece_computed_by_hand():
    # 100 inputs at confidence 0.95 with 70 correct, 300 at 0.55 with 150 correct:
    # ECE = 100/400 * |0.70 - 0.95| + 300/400 * |0.50 - 0.55| = 0.0625 + 0.0375 = 0.1
    confidence = np.r_[np.full(100, 0.95), np.full(300, 0.55)]
    correct = np.r_[np.arange(100) < 70, np.arange(300) < 150]
    probs, labels = _predictions(confidence, correct)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.1, abs=1e-12)
    # one bin: the gap between mean accuracy (220/400) and mean confidence (0.65)
    assert expected_calibration_error(probs, labels, n_bins=1) == pytest.approx(0.1, abs=1e-12)
    bins = reliability_bins(probs, labels)
    assert bins.count.sum() == 400 and np.count_nonzero(bins.count) == 2
    full = bins.count > 0
    np.testing.assert_allclose(bins.accuracy[full], [0.5, 0.7])
    np.testing.assert_allclose(bins.confidence[full], [0.55, 0.95])
    assert np.all(np.isnan(bins.accuracy[~full])) and np.all(np.isnan(bins.confidence[~full]))


def test_gaps_of_opposite_sign_in_different_bins_do_not_cancel():
    # underconfident at 0.3 (all correct), overconfident at 0.9 (none correct)
    probs, labels = _predictions([0.3, 0.3, 0.9, 0.9], [True, True, False, False])
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.5 * 0.7 + 0.5 * 0.9)


def test_bins_are_closed_on_the_right_and_confidence_one_is_in_the_last_bin():
    np.testing.assert_array_equal(bin_index(np.array([0.0, 0.1, 0.2, 0.2001, 0.5, 0.99, 1.0]), 5),
                                  [0, 0, 0, 1, 2, 4, 4])
    probs, labels = _predictions([1.0, 1.0, 1.0], [True, True, True])
    bins = reliability_bins(probs, labels, n_bins=15)
    assert bins.count[-1] == 3 and bins.accuracy[-1] == 1.0
    assert expected_calibration_error(probs, labels) == 0.0
    np.testing.assert_allclose(bins.edges, np.linspace(0, 1, 16))


def test_a_torch_like_float32_input_is_accepted():
    probs, labels = _predictions([0.8, 0.6], [True, False])
    got = expected_calibration_error(probs.astype(np.float32), labels.astype(np.int64), n_bins=10)
    assert got == pytest.approx(0.5 * 0.2 + 0.5 * 0.6, abs=1e-6)


@pytest.mark.parametrize(
    ("probs", "labels", "n_bins", "argument"),
    [
        (np.full((2, 2), 0.5), np.array([0, 1]), 0, "n_bins"),
        (np.full((2, 2), 0.5), np.array([0, 1]), 2.5, "n_bins"),
        (np.full((2, 2), 0.5), np.array([0, 1]), True, "n_bins"),
        (np.full(4, 0.5), np.array([0, 1]), 15, "probs"),
        (np.zeros((0, 3)), np.zeros(0, int), 15, "probs"),
        (np.array([[2.0, -1.0], [0.5, 0.5]]), np.array([0, 1]), 15, "probs"),   # logits
        (np.array([[0.2, 0.2], [0.5, 0.5]]), np.array([0, 1]), 15, "probs"),    # row sum != 1
        (np.array([[np.nan, 0.5], [0.5, 0.5]]), np.array([0, 1]), 15, "probs"),
        (np.full((2, 2), 0.5), np.array([0, 1, 1]), 15, "labels"),
        (np.full((2, 2), 0.5), np.array([0.0, 1.0]), 15, "labels"),
        (np.full((2, 2), 0.5), np.array([0, 2]), 15, "labels"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(probs, labels, n_bins, argument):
    with pytest.raises(ValueError, match=argument):
        expected_calibration_error(probs, labels, n_bins=n_bins)
    with pytest.raises(ValueError, match=argument):
        reliability_bins(probs, labels, n_bins=n_bins)
