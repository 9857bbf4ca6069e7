"""The array module (`xp`): numpy on the CPU, cupy on the GPU.

The device is chosen in ONE place, where parameters and batches are created
(`get_device_module('cpu' | 'gpu')`, driven by the run scripts' `--device` flag
or, for the tests, the `SUPERNET_DEVICE` environment variable). Every compute
function in `nn/` and `supernet.py` takes its array module from its inputs,
exactly as `cupy.get_array_module` does:

    xp = get_xp(x, w)          # numpy for numpy arrays, cupy for cupy arrays

so no global switch leaks into the kernels, and a function called with numpy
arrays never touches the GPU.

Helpers move arrays between host and device: `to_device(a, xp)`, `to_host(a)`.
`register_array_module(array_type, module)` lets another array type (the tests'
strict stand-in for cupy) declare its module.
"""
import os

import numpy as np

_REGISTRY = []          # [(array_type, module)], searched in order by get_xp
_CUPY_CHECKED = False


def register_array_module(array_type, module):
    """Declare that arrays of `array_type` are computed with `module`."""
    _REGISTRY.append((array_type, module))


def _maybe_register_cupy():
    global _CUPY_CHECKED
    if _CUPY_CHECKED:
        return
    _CUPY_CHECKED = True
    import sys
    cp = sys.modules.get('cupy')      # only if the caller already imported it
    if cp is not None:
        register_array_module(cp.ndarray, cp)


def get_xp(*arrays):
    """Array module of the inputs (numpy unless one of them is a device array)."""
    _maybe_register_cupy()
    for a in arrays:
        for array_type, module in _REGISTRY:
            if isinstance(a, array_type):
                return module
    return np


def get_device_module(device=None):
    """numpy for 'cpu', cupy for 'gpu'; None reads $SUPERNET_DEVICE (default cpu).

    Raises RuntimeError with a clear message when the GPU is asked for and
    cupy or a working CUDA device is missing.
    """
    if device is None:
        device = os.environ.get('SUPERNET_DEVICE', 'cpu')
    device = device.lower()
    if device == 'cpu':
        return np
    if device not in ('gpu', 'cuda'):
        raise ValueError(f"unknown device {device!r}: use 'cpu' or 'gpu'")
    try:
        import cupy as cp
    except ImportError as e:
        raise RuntimeError(
            "--device gpu needs CuPy, which is not installed. Install the GPU extra "
            "(pip install '.[gpu]', or the cupy-cudaXXx wheel matching your CUDA) "
            "or run with --device cpu.") from e
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as e:   # CUDA driver missing or broken
        raise RuntimeError(f"--device gpu: CuPy is installed but no CUDA device works ({e}). "
                           "Run with --device cpu.") from e
    if n < 1:
        raise RuntimeError("--device gpu: CuPy found no CUDA device. Run with --device cpu.")
    global _CUPY_CHECKED
    _CUPY_CHECKED = False
    _maybe_register_cupy()
    return cp


def to_device(a, xp):
    """Copy a host array (or scalar) onto the device of module `xp` (no-op for numpy)."""
    if xp is np:
        return to_host(a)
    return xp.asarray(a)


def to_host(a):
    """A numpy copy/view of `a`, wherever it lives."""
    if isinstance(a, np.ndarray) or np.isscalar(a):
        return np.asarray(a)
    if hasattr(a, 'get'):            # cupy.ndarray
        return a.get()
    if hasattr(a, 'to_host'):        # the tests' strict stand-in
        return a.to_host()
    return np.asarray(a)


def synchronize(xp):
    """Wait for queued device work (for timing); no-op on the CPU."""
    if xp is not np and hasattr(xp, 'cuda'):
        xp.cuda.Stream.null.synchronize()
