"""A strict stand-in for CuPy, to prove the compute path is device-agnostic without a GPU.

`StrictArray` wraps a numpy array the way a cupy array wraps device memory:
  * mixing it with a plain numpy array (in an operator or an xp function) raises TypeError,
  * any `np.` function called on it raises TypeError (no implicit host conversion),
so a stray `np.` call or a host array in the hot path fails the test, as it
would on a GPU. `strict` is its module (`xp`); register it with the backend so
that `get_xp(a)` returns it.
"""
import operator

import numpy as np

from nn.backend import register_array_module


class MixError(TypeError):
    pass


def _unwrap(v, allow_host=False):
    if isinstance(v, StrictArray):
        return v._a
    if isinstance(v, np.ndarray):
        if allow_host:
            return v
        raise MixError("host numpy array mixed with a device array")
    if isinstance(v, (list, tuple)):
        return type(v)(_unwrap(e, allow_host) for e in v)
    if isinstance(v, dict):
        return {k: _unwrap(e, allow_host) for k, e in v.items()}
    return v


def _wrap(v):
    if isinstance(v, np.ndarray):
        return StrictArray(v)
    if isinstance(v, np.generic):          # reductions give 0-d device arrays, as in cupy
        return StrictArray(np.asarray(v))
    if isinstance(v, tuple):
        return tuple(_wrap(e) for e in v)
    if isinstance(v, list):
        return [_wrap(e) for e in v]
    return v


class StrictArray:
    __array_ufunc__ = None          # numpy ufuncs and ndarray operators refuse us

    def __init__(self, a):
        self._a = a

    def __array__(self, *args, **kwargs):
        raise MixError("implicit conversion of a device array to numpy (use to_host)")

    def __array_function__(self, func, types, args, kwargs):
        raise MixError(f"np.{func.__name__} called on a device array")

    def to_host(self):
        return self._a.copy()

    # attributes and methods: delegate, unwrapping arguments and wrapping results
    def __getattr__(self, name):
        if name.startswith('__'):      # no __array_interface__ & co: no implicit host views
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if callable(attr):
            def method(*args, **kwargs):
                return _wrap(attr(*_unwrap(args), **_unwrap(kwargs)))
            return method
        return _wrap(attr)

    @property
    def T(self):
        return StrictArray(self._a.T)

    def __len__(self):
        return len(self._a)

    def __getitem__(self, key):
        return _wrap(self._a[_unwrap(key)])

    def __setitem__(self, key, value):
        self._a[_unwrap(key)] = _unwrap(value)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __bool__(self):
        return bool(self._a)

    def __repr__(self):
        return f"StrictArray({self._a!r})"


def _binop(op):
    def f(self, other):
        return _wrap(op(self._a, _unwrap(other)))
    return f


def _rbinop(op):
    def f(self, other):
        return _wrap(op(_unwrap(other), self._a))
    return f


def _iop(op):
    def f(self, other):
        op(self._a, _unwrap(other))
        return self
    return f


for _name, _op in [('add', operator.add), ('sub', operator.sub), ('mul', operator.mul),
                   ('truediv', operator.truediv), ('matmul', operator.matmul),
                   ('pow', operator.pow), ('floordiv', operator.floordiv), ('mod', operator.mod),
                   ('and', operator.and_), ('or', operator.or_)]:
    setattr(StrictArray, f'__{_name}__', _binop(_op))
    setattr(StrictArray, f'__r{_name}__', _rbinop(_op))
    setattr(StrictArray, f'__i{_name}__', _iop(getattr(operator, 'i' + _name)))
for _name, _op in [('lt', operator.lt), ('le', operator.le), ('gt', operator.gt),
                   ('ge', operator.ge), ('eq', operator.eq), ('ne', operator.ne)]:
    setattr(StrictArray, f'__{_name}__', _binop(_op))
StrictArray.__neg__ = lambda self: StrictArray(-self._a)
StrictArray.__abs__ = lambda self: StrictArray(abs(self._a))
StrictArray.__invert__ = lambda self: StrictArray(~self._a)


class _StrictStrideTricks:
    """xp.lib.stride_tricks.as_strided, as cupy.lib.stride_tricks has it (strides in bytes)."""
    @staticmethod
    def as_strided(x, shape=None, strides=None):
        if not isinstance(x, StrictArray):
            raise MixError("as_strided of a host array")
        return StrictArray(np.lib.stride_tricks.as_strided(x._a, shape=shape, strides=strides))


class _StrictLib:
    stride_tricks = _StrictStrideTricks()


class _StrictModule:
    """numpy's namespace, but every function takes and returns StrictArrays and
    refuses host arrays (except the explicit transfers asarray/array; ascontiguousarray is
    not one: CuPy's takes only a cupy.ndarray)."""
    _TRANSFER = {'asarray', 'array'}
    lib = _StrictLib()

    def __getattr__(self, name):
        attr = getattr(np, name)
        if isinstance(attr, type) or not callable(attr):
            return attr                     # dtypes (xp.float32), constants (xp.pi)
        allow_host = name in self._TRANSFER

        def f(*args, **kwargs):
            return _wrap(attr(*_unwrap(args, allow_host), **_unwrap(kwargs, allow_host)))
        f.__name__ = name
        return f


strict = _StrictModule()
register_array_module(StrictArray, strict)
