import numpy as np
import pytest
from scipy import integrate, stats

from hlwq_jax.quant.lloyd_max import gaussian_mse, lloyd_max_codebook

# docs/hlwq.md §2: converged Lloyd-Max MSE and outer centroid for a unit Gaussian.
TABLE = {1: (0.3634, 0.798), 2: (0.1175, 1.510), 3: (0.03455, 2.152), 4: (0.009501, 2.733),
         5: (0.002505, 3.261), 6: (0.0006442, 3.744), 7: (0.0001635, 4.190), 8: (4.119e-5, 4.604)}
POLAR5_POS = [0.0880, 0.2641, 0.4404, 0.6173, 0.7951, 0.9741, 1.1550, 1.3387,
              1.5266, 1.7207, 1.9241, 2.1420, 2.3829, 2.6629, 3.0169, 3.5516]


@pytest.mark.parametrize("bits", range(1, 9))
def test_converged_mse_matches_table(bits):
    c = lloyd_max_codebook(bits)
    mse, outer = TABLE[bits]
    assert c.dtype == np.float64 and c.shape == (2**bits,) and np.all(np.diff(c) > 0)
    assert float(f"{gaussian_mse(c):.4g}") == pytest.approx(mse, rel=6e-4)  # 3+ significant digits
    assert c[-1] == pytest.approx(outer, abs=6e-4)
    np.testing.assert_allclose(c, -c[::-1], atol=1e-9)  # symmetric


def test_gaussian_mse_matches_numerical_integration():
    c = lloyd_max_codebook(3)
    bounds = np.concatenate([[-np.inf], 0.5 * (c[1:] + c[:-1]), [np.inf]])
    total = sum(integrate.quad(lambda x, ci=ci: (x - ci) ** 2 * stats.norm.pdf(x), a, b)[0]
                for a, b, ci in zip(bounds[:-1], bounds[1:], c))
    assert gaussian_mse(c) == pytest.approx(total, rel=1e-8)


@pytest.mark.parametrize("bits", [2, 4, 6])
def test_converged_is_a_lloyd_fixed_point(bits):
    """Each centroid is the conditional mean of its Voronoi cell (checked by quadrature, independent of the code)."""
    c = lloyd_max_codebook(bits)
    bounds = np.concatenate([[-np.inf], 0.5 * (c[1:] + c[:-1]), [np.inf]])
    for a, b, ci in zip(bounds[:-1], bounds[1:], c):
        m0 = stats.norm.cdf(b) - stats.norm.cdf(a)
        m1 = integrate.quad(lambda x: x * stats.norm.pdf(x), a, b)[0]
        assert m1 / m0 == pytest.approx(ci, abs=1e-7)


def test_polarengine_variant_reproduces_original():
    c = lloyd_max_codebook(5, "polarengine")
    np.testing.assert_allclose(c[16:], POLAR5_POS, atol=6e-5)
    assert gaussian_mse(c) == pytest.approx(0.002923, rel=2e-4)
    assert gaussian_mse(lloyd_max_codebook(6, "polarengine")) == pytest.approx(0.001047, rel=1e-3)
    assert gaussian_mse(lloyd_max_codebook(8, "polarengine")) == pytest.approx(8.03e-5, rel=1e-3)


def test_polarengine_torch_variant_differs_by_up_to_013():
    a, b = lloyd_max_codebook(5, "polarengine"), lloyd_max_codebook(5, "polarengine-torch")
    assert np.max(np.abs(a - b)) == pytest.approx(0.13, abs=0.01)
    assert np.all(np.abs(b) <= 4.0)


@pytest.mark.parametrize("bad", [0, 9, 2.5, "5"])
def test_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        lloyd_max_codebook(bad)


def test_bad_variant():
    with pytest.raises(ValueError, match="variant"):
        lloyd_max_codebook(4, "optimal")
