import numpy as np

from experiments.output_error import errors


def test_errors_closed_forms(rng):
    w = rng.standard_normal((6, 5))
    e = 0.1 * rng.standard_normal((6, 5))
    r = errors(w, w - e, np.eye(5))                      # white inputs: output error = weight error
    assert np.isclose(r["output_rel"], r["weight_rel"]) and np.isclose(r["diag_rel"], r["weight_rel"])
    assert np.isclose(r["weight_rel"], np.sum(e * e) / np.sum(w * w))
    x = np.zeros((3, 5))
    x[:, 2] = [1.0, -2.0, 3.0]                          # one active input channel: only column 2 matters
    r = errors(w, w - e, x)
    share = np.sum(e[:, 2] ** 2) / np.sum(w[:, 2] ** 2)
    assert np.isclose(r["output_rel"], share) and np.isclose(r["diag_rel"], share)
