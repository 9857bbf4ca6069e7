"""Numerical gradients by centred finite differences, for checking hand-written backwards.

    df/dx_i ~ (f(x + h e_i) - f(x - h e_i)) / (2h)        (error O(h^2); use float64, h ~ 1e-5)

For an array-valued f with upstream gradient g, the scalar checked is sum(f(x) * g):
use a random g (a gradient of ones hides transposition and broadcasting bugs).

rel_error(a, b) = max|a - b| / max(1e-8, max|a| + max|b|)
(the max-norm relative error: ~1e-10..1e-8 for a correct backward in float64,
 ~1e-2 or worse for a wrong one).
"""
import numpy as np

from .backend import to_host


def rel_error(a, b):
    a, b = to_host(a).astype(np.float64), to_host(b).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error: shapes {a.shape} and {b.shape} differ")
    return float(np.max(np.abs(a - b)) / max(1e-8, np.max(np.abs(a)) + np.max(np.abs(b))))


def sample_indices(shape, n, rng):
    """Up to n distinct flat indices of an array of this shape (all of them if it is small)."""
    size = int(np.prod(shape))
    if n is None or n >= size:
        return np.arange(size)
    return rng.choice(size, size=n, replace=False)


def numerical_gradient(f, x, df=None, h=1e-5, idx=None):
    """Centred-difference gradient of sum(f() * df) with respect to the array x.

    f:   callable with no arguments that reads x (x is perturbed in place and restored)
    x:   float64 array (modified in place during the call)
    df:  upstream gradient of f's output; None when f returns a scalar
    idx: flat indices to check (None = all)
    returns (grad at idx,) as a float64 vector
    """
    if x.dtype != np.float64:
        raise TypeError(f"numerical_gradient needs float64 inputs (got {x.dtype}): "
                        "float32 differences are dominated by rounding")
    flat = x.reshape(-1)
    if idx is None:
        idx = np.arange(flat.size)

    def scalar():
        out = f()
        return float(np.sum(to_host(out) * (1.0 if df is None else to_host(df))))

    grad = np.empty(len(idx))
    for n, i in enumerate(idx):
        old = flat[i].item()
        flat[i] = old + h
        fp = scalar()
        flat[i] = old - h
        fm = scalar()
        flat[i] = old
        grad[n] = (fp - fm) / (2 * h)
    return grad


def check_gradient(f, x, analytic, df=None, h=1e-5, n_samples=None, seed=0):
    """rel_error between `analytic` (the backward's dx) and the numerical gradient of x,
    on n_samples random coordinates (all if None)."""
    idx = sample_indices(x.shape, n_samples, np.random.default_rng(seed))
    num = numerical_gradient(f, x, df, h, idx)
    return rel_error(to_host(analytic).reshape(-1)[idx], num)
