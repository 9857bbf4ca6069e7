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

CPU threads. numpy runs each call on one core (BLAS aside), so the CPU work is split by
us: `set_num_threads(n)` starts a pool of n threads and `parallel_map(fn, items)` runs
fn over items on it (numpy releases the GIL inside its kernels). The callers split
coarsely: the classifier by image shards (or task groups), the optimizer by chunks of
the parameter, the generator's big layer by column blocks when it serves several task
vectors (for one it is bound by memory bandwidth, which a second thread does not add
to here). BLAS is then set to one thread, so the two kinds of threads never compete
for the cores. Until set_num_threads is called
everything runs on the calling thread and BLAS is left as it was.
"""
import ctypes
import os
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from . import workers     # imported with the backend: it notes the start-up directory for its workers

_REGISTRY = []          # [(array_type, module)], searched in order by get_xp
_CUPY_REGISTERED = False


def register_array_module(array_type, module):
    """Declare that arrays of `array_type` are computed with `module`."""
    _REGISTRY.append((array_type, module))


def _maybe_register_cupy():
    """Register CuPy once it has been imported (by anyone, at any time): get_xp never
    imports it itself, and looks again on every call until it is there (a dict lookup)."""
    global _CUPY_REGISTERED
    if _CUPY_REGISTERED:
        return
    cp = sys.modules.get('cupy')
    if cp is not None:
        register_array_module(cp.ndarray, cp)
        _CUPY_REGISTERED = True


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


# --------------------------------------------------------------------------- CPU threads

_POOL = None            # ThreadPoolExecutor with n - 1 workers (the caller is the n-th)
_NTHREADS = 1
_SHARD_KINDS = ('processes', 'threads')
_SHARD_WORKERS = os.environ.get('SUPERNET_WORKERS') or 'processes'
if _SHARD_WORKERS not in _SHARD_KINDS:
    raise ImportError(f"SUPERNET_WORKERS must be 'processes' or 'threads', got {_SHARD_WORKERS!r}")
_POOL_LOCK = threading.Lock()


def usable_cpus():
    """CPUs this process may run on (its affinity mask, not the machine's total)."""
    if hasattr(os, 'sched_getaffinity'):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_error(n):
    """What is wrong with a --threads value n (0: every usable CPU), or None: the one check
    of the command lines (run scripts, bench.py), made before any work starts."""
    if n < 0:
        return f"--threads must be >= 0 (0: every usable CPU), got {n}"
    cpus = usable_cpus()
    if n > cpus:
        return f"--threads {n}: this machine has {cpus} usable CPU{'s' * (cpus != 1)}"
    return None


def _openblas_functions(suffix):
    """The `<prefix>_<suffix>` functions of the OpenBLAS libraries loaded in this process
    (Linux: found in /proc/self/maps, as threadpoolctl does). numpy's wheels ship OpenBLAS
    under a prefixed, 64-bit-suffixed name (scipy_openblas_set_num_threads64_)."""
    try:
        with open('/proc/self/maps') as f:
            paths = {line.split()[-1] for line in f if 'openblas' in line.lower() and '.so' in line}
    except OSError:
        return []
    found = []
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in (f'openblas_{suffix}', f'scipy_openblas_{suffix}64_', f'scipy_openblas_{suffix}',
                     f'openblas_{suffix}64_'):
            fn = getattr(lib, name, None)
            if fn is not None:
                found.append(fn)
                break
    return found


def set_blas_threads(n):
    """Set OpenBLAS's thread count at run time. Returns False when no OpenBLAS was found
    (another BLAS: set its environment variable, e.g. MKL_NUM_THREADS, before starting)."""
    setters = _openblas_functions('set_num_threads')
    for fn in setters:
        fn.argtypes, fn.restype = [ctypes.c_int], None
        fn(int(n))
    return bool(setters)


def get_blas_threads():
    """OpenBLAS's thread count, or None when no OpenBLAS was found."""
    getters = _openblas_functions('get_num_threads')
    if not getters:
        return None
    getters[0].argtypes, getters[0].restype = [], ctypes.c_int
    return int(getters[0]())


def set_num_threads(n=None):
    """Run the CPU work on n threads (None or 0: every usable CPU). OpenBLAS is set to one
    thread: the parallelism is ours (another BLAS cannot be set from here: a warning says
    so when n > 1). Returns n."""
    global _POOL, _NTHREADS
    if n is not None and int(n) < 0:
        raise ValueError(f"threads must be >= 1, or 0 for every usable CPU; got {n}")
    n = usable_cpus() if not n else int(n)
    with _POOL_LOCK:
        if n != _NTHREADS or (n > 1) != (_POOL is not None):
            if _POOL is not None:
                _POOL.shutdown(wait=True)
            _POOL = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix='supernet') if n > 1 else None
            _NTHREADS = n
            workers.stop_workers()                     # fewer CPUs: fewer worker processes
    if not set_blas_threads(1) and n > 1:
        warnings.warn("supernet: no OpenBLAS found to set to one thread; set your BLAS's own thread "
                      "count to 1 (e.g. MKL_NUM_THREADS=1) so that it and supernet's threads do not "
                      "compete for the cores", RuntimeWarning, stacklevel=2)
    return n


def get_num_threads():
    """The threads parallel_map uses (1 until set_num_threads is called)."""
    return _NTHREADS


def parallel_map(fn, items):
    """[fn(item) for item in items], the items spread over the thread pool (the calling
    thread takes the first). Exceptions propagate. Serial with one thread."""
    items = list(items)
    pool = _POOL
    if pool is None or len(items) < 2:
        return [fn(it) for it in items]
    futures = [pool.submit(fn, it) for it in items[1:]]
    try:
        first = fn(items[0])
    finally:
        wait(futures)                     # every item has finished before anything goes up
    return [first] + [f.result() for f in futures]


def set_shard_workers(kind):
    """How map_shards runs its calls with several CPUs: 'processes' (worker processes,
    the default; nn/workers.py says why) or 'threads' (the thread pool, as parallel_map).
    The environment variable SUPERNET_WORKERS sets the default. Returns the old kind."""
    global _SHARD_WORKERS
    if kind not in _SHARD_KINDS:
        raise ValueError(f"shard workers must be 'processes' or 'threads', got {kind!r}")
    old, _SHARD_WORKERS = _SHARD_WORKERS, kind
    return old


def get_shard_workers():
    """What map_shards uses with several CPUs: 'processes' or 'threads' (also where worker
    processes are asked for but unavailable: not POSIX)."""
    return 'processes' if _SHARD_WORKERS == 'processes' and os.name == 'posix' else 'threads'


def map_shards(fn, calls):
    """[fn(*args) for args in calls] for the classifier's shards (one per CPU): side by side
    in worker processes (the calling process takes the first; fn must be a module-level
    function and the arguments picklable) or on the thread pool (set_shard_workers).
    Serial with one thread. Same numbers either way."""
    calls = list(calls)
    if _NTHREADS > 1 and len(calls) > 1 and get_shard_workers() == 'processes':
        return workers.map_processes(fn, calls)
    return parallel_map(lambda args: fn(*args), calls)


def split_range(n, parts):
    """Cut range(n) into at most `parts` contiguous, near-equal slices (non-empty, but
    one empty slice for n = 0)."""
    parts = max(1, min(parts, n))
    bounds = [n * i // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
