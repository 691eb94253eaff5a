import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hlwq_jax.ops.ssd import IMPLS, ssd, ssd_step
from hlwq_jax.ops.ssd.reference import segsum, ssd_recurrence_numpy


def _inputs(rng, b=2, l=21, h=6, p=4, g=2, n=5):
    x = rng.standard_normal((b, l, h, p))
    dt = np.log1p(np.exp(rng.standard_normal((b, l, h)) - 1.0))
    A = -np.exp(rng.standard_normal(h) * 0.5)
    Bm = rng.standard_normal((b, l, g, n))
    Cm = rng.standard_normal((b, l, g, n))
    S0 = rng.standard_normal((b, h, p, n))
    return x, dt, A, Bm, Cm, S0


def _j(*ts):
    return [jnp.asarray(t, jnp.float32) for t in ts]


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def test_segsum_definition(rng):
    a = rng.standard_normal(5)
    s = np.asarray(segsum(jnp.asarray(a, jnp.float32)))
    for i in range(5):
        for j in range(5):
            want = a[j + 1:i + 1].sum() if j <= i else -np.inf
            assert s[i, j] == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("chunk", [4, 32])
def test_chunked_equals_recurrence(rng, impl, chunk):
    x, dt, A, Bm, Cm, S0 = _inputs(rng)
    y_ref, s_ref = ssd_recurrence_numpy(x, dt, A, Bm, Cm, S0)
    y, s = ssd(*_j(x, dt, A, Bm, Cm), chunk_size=chunk, initial_state=jnp.asarray(S0, jnp.float32), impl=impl)
    assert _rel(y, y_ref) < 1e-5 and _rel(s, s_ref) < 1e-5


def test_split_calls_carry_state(rng):
    x, dt, A, Bm, Cm, _ = _inputs(rng, l=19)
    y_ref, s_ref = ssd_recurrence_numpy(x, dt, A, Bm, Cm)
    xs, dts, Bs, Cs = _j(x, dt, Bm, Cm)
    a = jnp.asarray(A, jnp.float32)
    y1, s1 = ssd(xs[:, :11], dts[:, :11], a, Bs[:, :11], Cs[:, :11], chunk_size=4)
    y2, s2 = ssd(xs[:, 11:], dts[:, 11:], a, Bs[:, 11:], Cs[:, 11:], chunk_size=4, initial_state=s1)
    assert _rel(jnp.concatenate([y1, y2], 1), y_ref) < 1e-5 and _rel(s2, s_ref) < 1e-5


def test_step_equals_recurrence(rng):
    x, dt, A, Bm, Cm, S0 = _inputs(rng, l=3)
    y_ref, s_ref = ssd_recurrence_numpy(x, dt, A, Bm, Cm, S0)
    s = jnp.asarray(S0, jnp.float32)
    step = jax.jit(ssd_step)
    for t in range(3):
        y, s = step(s, *_j(x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t]))
    assert _rel(y, y_ref[:, -1]) < 1e-5 and _rel(s, s_ref) < 1e-5


def test_strong_decay_is_finite(rng):
    x, dt, A, Bm, Cm, _ = _inputs(rng, l=40)
    dt = dt * 50.0  # exp(dt*A) underflows to 0 inside a chunk: a difference of cumsums would give inf - inf
    y, s = ssd(*_j(x, dt, A, Bm, Cm), chunk_size=16)
    y_ref, _ = ssd_recurrence_numpy(x, dt, A, Bm, Cm)
    assert np.all(np.isfinite(np.asarray(y))) and _rel(y, y_ref) < 1e-4


def test_bad_impl_and_shapes(rng):
    x, dt, A, Bm, Cm, _ = _j(*_inputs(rng))
    with pytest.raises(ValueError, match="unknown impl"):
        ssd(x, dt, A, Bm, Cm, chunk_size=4, impl="triton")
    with pytest.raises(ValueError, match="inconsistent"):
        ssd(x, dt[:, :3], A, Bm, Cm, chunk_size=4)
