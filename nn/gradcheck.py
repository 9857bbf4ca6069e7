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
    x:   float64 array, any strides (a view works: each coordinate is set through its
         multi-index, so the perturbation reaches whatever f reads); modified in place
         during the call, so it must be writeable
    df:  upstream gradient of f's output; None when f returns a scalar
    idx: flat (C-order) indices to check (None = all)
    returns (grad at idx,) as a float64 vector
    """
    if x.dtype != np.float64:
        raise TypeError(f"numerical_gradient needs float64 inputs (got {x.dtype}): "
                        "float32 differences are dominated by rounding")
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        raise ValueError("numerical_gradient: x is read-only (a broadcast or strided view?): "
                         "it must be perturbed in place")
    if idx is None:
        idx = np.arange(int(np.prod(x.shape)))

    def scalar():
        out = f()
        return float(np.sum(to_host(out) * (1.0 if df is None else to_host(df))))

    grad = np.empty(len(idx))
    for n, i in enumerate(idx):
        at = np.unravel_index(int(i), x.shape)      # not x.reshape(-1)[i]: that is a copy for a view
        old = x[at].item()
        x[at] = old + h
        fp = scalar()
        x[at] = old - h
        fm = scalar()
        x[at] = old
        grad[n] = (fp - fm) / (2 * h)
    return grad


def check_gradient(f, x, analytic, df=None, h=1e-5, n_samples=None, seed=0, idx=None, min_grad=None,
                   name='check_gradient'):
    """rel_error between `analytic` (the backward's dx, of x's shape) and the numerical
    gradient of x, on n_samples random coordinates (all if None) or on the flat indices idx.
    min_grad: raise if the sampled numerical gradient's max |.| is not above it (a check of
    a gradient that is zero everywhere sampled would pass whatever the backward did).
    name: what the error messages start with (which check failed)."""
    if tuple(analytic.shape) != tuple(x.shape):
        raise ValueError(f"{name}: the analytic gradient has shape {tuple(analytic.shape)}, "
                         f"the input {tuple(x.shape)}")
    if idx is None:
        idx = sample_indices(x.shape, n_samples, np.random.default_rng(seed))
    num = numerical_gradient(f, x, df, h, idx)
    if min_grad is not None and not np.max(np.abs(num), initial=0.0) > min_grad:
        raise RuntimeError(f"{name}: the sampled numerical gradient is at most {min_grad:g} "
                           "in magnitude: the check would prove nothing")
    return rel_error(to_host(analytic).reshape(-1)[idx], num)
