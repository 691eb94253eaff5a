"""Lloyd-Max scalar codebooks for a unit Gaussian (docs/hlwq.md §2).

Three variants, all float64 and ascending:

* ``"converged"`` — iterate the Lloyd-Max conditions (centroid = conditional mean of its interval, boundary =
  midpoint of neighbouring centroids) from the Panter–Dite compander start until the centroids stop moving.
  Reproduces Max (1960): 5-bit MSE 0.002505.
* ``"polarengine"`` — the original HLWQ numpy code: exactly 100 iterations from boundaries
  ``linspace(-4, 4, 2^b + 1)`` with the outer ends at ±∞ (does not converge at ≥ 5 bits: 5-bit MSE 0.002923).
* ``"polarengine-torch"`` — the original torch code: same start, outer boundaries kept at ±4, float32 arithmetic.

Also: ``gaussian_mse(codebook)``, the exact distortion E[(X − Q(X))²] of nearest-centroid quantisation of X ~ N(0, 1).
"""
from __future__ import annotations

import functools

import numpy as np
from scipy import special

VARIANTS = ("converged", "polarengine", "polarengine-torch")


def _pdf(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)


def _cdf(x: np.ndarray) -> np.ndarray:
    return special.ndtr(x)


def _centroids(bounds: np.ndarray) -> np.ndarray:
    """Conditional means of N(0,1) on [bounds[i], bounds[i+1]]: (φ(a) − φ(b)) / (Φ(b) − Φ(a))."""
    a, b = bounds[:-1], bounds[1:]
    mass = _cdf(b) - _cdf(a)
    # Far tails: Φ differences underflow; the centroid of a tiny far interval is its midpoint-ish limit.
    return np.where(mass > 1e-300, (_pdf(a) - _pdf(b)) / np.maximum(mass, 1e-300), 0.5 * (a + b))


def gaussian_mse(codebook: np.ndarray) -> float:
    """E[(X − Q(X))²] for X ~ N(0,1) and Q = nearest point of the (ascending) ``codebook``, in float64.

    Uses ∫_a^b (x − c)² φ = [Φ]·(1 + c²) − 2c[−φ] + [−xφ] evaluated between the Voronoi boundaries.
    """
    c = np.asarray(codebook, np.float64)
    bounds = np.concatenate([[-np.inf], 0.5 * (c[1:] + c[:-1]), [np.inf]])
    a, b = bounds[:-1], bounds[1:]
    mass = _cdf(b) - _cdf(a)
    first = _pdf(a) - _pdf(b)  # ∫ x φ
    xphi = lambda t: np.where(np.isfinite(t), t * _pdf(np.where(np.isfinite(t), t, 0.0)), 0.0)
    second = mass + xphi(a) - xphi(b)  # ∫ x² φ
    return float(np.sum(second - 2.0 * c * first + c * c * mass))


def _converged(n: int) -> np.ndarray:
    # Panter–Dite start: boundaries at midpoints of √3·Φ⁻¹((i + ½)/n).
    start = np.sqrt(3.0) * special.ndtri((np.arange(n) + 0.5) / n)
    bounds = np.concatenate([[-np.inf], 0.5 * (start[1:] + start[:-1]), [np.inf]])
    c = _centroids(bounds)
    for _ in range(500_000):
        bounds[1:-1] = 0.5 * (c[1:] + c[:-1])
        new = _centroids(bounds)
        if np.max(np.abs(new - c)) < 1e-10:  # float64 noise floor at 256 levels is ~1e-11
            return new
        c = new
    raise RuntimeError(f"Lloyd-Max for {n} levels did not converge")  # pragma: no cover


def _polarengine(n: int, torch_variant: bool) -> np.ndarray:
    dtype = np.float32 if torch_variant else np.float64
    bounds = np.linspace(-4.0, 4.0, n + 1).astype(dtype)
    if not torch_variant:
        bounds[0], bounds[-1] = -np.inf, np.inf
    c = np.zeros(n, dtype)
    for _ in range(100):
        c = _centroids(bounds.astype(np.float64)).astype(dtype)
        bounds[1:-1] = (0.5 * (c[1:] + c[:-1])).astype(dtype)
    return c.astype(np.float64)


@functools.lru_cache(maxsize=None)
def _codebook(bits: int, variant: str) -> np.ndarray:
    n = 1 << bits
    if variant == "converged":
        return _converged(n)
    return _polarengine(n, torch_variant=(variant == "polarengine-torch"))


def lloyd_max_codebook(bits: int, variant: str = "converged") -> np.ndarray:
    """Ascending float64 Lloyd-Max centroids for N(0, 1) with 2**bits levels.

    Args:
      bits: 1..8.
      variant: "converged" | "polarengine" | "polarengine-torch" (see module docstring).
    Returns:
      np.ndarray float64 [2**bits], ascending (a fresh copy).
    """
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown codebook variant {variant!r}; expected one of {VARIANTS}")
    return _codebook(int(bits), variant).copy()


def uniform_codebook(bits: int) -> np.ndarray:
    """Symmetric uniform grid on [−1, 1] with 2**bits levels (the absmax "Hadamard only" ablation)."""
    n = 1 << bits
    return np.linspace(-1.0, 1.0, n)
