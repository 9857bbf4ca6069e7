"""Module-level functions for tests/test_workers.py: a worker process imports them by name."""
import os
import time

import numpy as np


def echo(*args):
    """Its arguments, as received (arrays as the worker sees them)."""
    return args


def summary(x, d):
    """What the worker received: a check of the large array and the nested ones."""
    return {'sum': x.sum(), 'shape': x.shape, 'dtype': str(x.dtype), 'c': x.flags['C_CONTIGUOUS'],
            'twice': 2 * x, 'keys': sorted(d), 'small': d['small'] + 1}


def fail(message):
    raise ValueError(message)


def fail_if(i):
    """Fails for i != 0 (the calls [(0,), (1,)]: fine in the caller, fails in the worker)."""
    if i:
        raise ValueError('boom in the worker')
    return i


def die_if(i):
    """The worker process exits at once for i != 0."""
    if i:
        os._exit(3)
    return i


def pid():
    return os.getpid()


def interrupt_if_0(i):
    """Ctrl-C in the caller's share (i == 0) while the worker's share sleeps."""
    if i == 0:
        time.sleep(0.1)
        raise KeyboardInterrupt
    time.sleep(0.5)
    return i


def add_one_in_place(a):
    a += 1
    return a


def module_file():
    """Where the worker found supernet."""
    import supernet
    return supernet.__file__


def zeros(n):
    return np.zeros(n, np.float32)
