"""Worker processes: CPU work that runs side by side without sharing Python's GIL.

Why. numpy releases the GIL inside each kernel, so threads can run numpy side by side,
but a classifier pass is hundreds of short kernels, and between two of them a thread
must take the GIL back: with two threads busy, every hand-over is a thread wake-up.
On the 2-core VM of this project two threads each running a 64-image classifier shard
took 1.32x the time of one shard alone, two processes 1.08x
(results/threads-vs-processes.txt). So the classifier's shards run in worker
processes; the optimizer and the generator, whose arrays live in this process, stay on
threads (nn.backend.parallel_map).

How. `map_processes(fn, calls)` runs fn(*calls[0]) here and fn(*calls[i]) in worker
i (a fresh interpreter, started on first use, then kept; POSIX only: elsewhere
nn.backend.map_shards uses threads). fn must be a module-level function
(it is sent by name). Each worker has a socket and a shared-memory segment: the large
arrays of a call's arguments are copied into the segment and read there as views;
the worker writes the large arrays of its result after them, and the caller copies
them out. Everything else is pickled through the pipe. The results are the numbers
fn gives in this process (same code, same single-threaded BLAS).

Failures. A worker ignores Ctrl-C (the caller handles it). Any exception while a call
is out (in a worker, in fn here, Ctrl-C, a worker that died) stops every worker, so no
stale reply can be read later; they start again on the next call. A worker's
exception comes back as a RuntimeError carrying its traceback.
"""
import atexit
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import traceback
from multiprocessing import shared_memory
from multiprocessing.connection import Connection

import numpy as np

_LARGE = 1 << 14        # bytes: arrays at least this big go through shared memory
_ALIGN = 64             # byte alignment of each array in a segment (a cache line)

_WORKERS = []           # [_Worker], started on demand

# glibc's malloc in a fresh worker gave the freed memory of each classifier pass back
# to the system and page-faulted it in again on the next (4,600 faults, 18 MB, per
# 64-image pass: the worker's pass took twice the caller's). Keeping freed memory
# (arrays under 32 MB from the heap, up to 512 MB of it kept) removes that. Other C
# libraries ignore these variables; a value the user set wins.
_MALLOC_ENV = {'MALLOC_MMAP_THRESHOLD_': str(32 << 20), 'MALLOC_TRIM_THRESHOLD_': str(512 << 20)}
_LOCK = threading.Lock()


class _Ref:
    """An array in a worker's shared segment: where it is and what it looks like."""
    __slots__ = ('offset', 'shape', 'dtype')

    def __init__(self, offset, shape, dtype):
        self.offset, self.shape, self.dtype = offset, shape, dtype


def _pack(obj, buf, offset):
    """obj with its large numpy arrays copied into buf from byte `offset` on and replaced
    by _Refs; arrays that do not fit stay in obj (they are then pickled). Walks dicts,
    lists and tuples. -> (packed obj, first free offset)."""
    if isinstance(obj, np.ndarray) and obj.nbytes >= _LARGE and not obj.dtype.hasobject:
        start = -(-offset // _ALIGN) * _ALIGN
        if start + obj.nbytes <= len(buf):
            np.ndarray(obj.shape, obj.dtype, buffer=buf, offset=start)[...] = obj
            return _Ref(start, obj.shape, obj.dtype), start + obj.nbytes
        return obj, offset
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out[k], offset = _pack(v, buf, offset)
        return out, offset
    if isinstance(obj, (list, tuple)):
        items = []
        for v in obj:
            p, offset = _pack(v, buf, offset)
            items.append(p)
        return type(obj)(items), offset
    return obj, offset


def _unpack(obj, buf, copy):
    """The inverse of _pack: _Refs become arrays, views of buf (copy=False) or copies."""
    if isinstance(obj, _Ref):
        a = np.ndarray(obj.shape, obj.dtype, buffer=buf, offset=obj.offset)
        return a.copy() if copy else a
    if isinstance(obj, dict):
        return {k: _unpack(v, buf, copy) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unpack(v, buf, copy) for v in obj)
    return obj


def _attach(name):
    """Open the caller's segment without registering it with this process's resource
    tracker (the caller owns it and unlinks it; Python < 3.13 has no track=False)."""
    try:
        return shared_memory.SharedMemory(name=name, track=False)
    except TypeError:
        from multiprocessing import resource_tracker
        shm = shared_memory.SharedMemory(name=name)
        resource_tracker.unregister(shm._name, 'shared_memory')
        return shm


def _worker_main(fd):
    """A worker's loop on socket fd: (segment name, fn, packed args) in, ('ok', packed
    result) or ('error', traceback) out; None (or the caller gone) ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    from .backend import set_num_threads
    set_num_threads(1)                          # one thread here, BLAS included
    shm = None
    try:
        while True:
            try:
                msg = conn.recv_bytes()
            except EOFError:
                return
            try:
                msg = pickle.loads(msg)             # here, so that an unknown fn is an error reply
                if msg is None:
                    return
                name, fn, packed, free = msg
                if shm is None or shm.name != name:
                    if shm is not None:
                        shm.close()
                    shm = _attach(name)
                result = fn(*_unpack(packed, shm.buf, copy=False))
                reply = ('ok', _pack(result, shm.buf, free)[0])
                del result
            except BaseException:
                reply = ('error', traceback.format_exc())
            conn.send(reply)
            del reply
    finally:
        if shm is not None:
            shm.close()


class _Worker:
    """A worker process and the caller's end of its socket and segment. Started as a fresh
    interpreter (`python -c`, not multiprocessing's spawn, which would import the caller's
    main script again in the worker, so that a script without a __main__ guard ran twice)."""

    def __init__(self):
        here, there = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        for k, v in _MALLOC_ENV.items():
            env.setdefault(k, v)
        code = 'import sys; from nn.workers import _worker_main; _worker_main(int(sys.argv[1]))'
        self.process = subprocess.Popen([sys.executable, '-c', code, str(there.fileno())],
                                        pass_fds=(there.fileno(),), env=env, stdin=subprocess.DEVNULL)
        there.close()
        self.conn = Connection(here.detach())
        self.shm = None

    def send(self, fn, args):
        need = sum(a.nbytes + _ALIGN for a in _arrays(args) if a.nbytes >= _LARGE)
        if self.shm is None or self.shm.size < 2 * need:     # room for the result after the args
            self._close_segment()
            self.shm = shared_memory.SharedMemory(create=True, size=max(1 << 20, 4 * need))
        packed, free = _pack(args, self.shm.buf, 0)
        try:
            self.conn.send((self.shm.name, fn, packed, free))
        except OSError as e:
            raise self._stopped() from e

    def _stopped(self):
        return RuntimeError(f"a supernet worker process stopped unexpectedly (exit code {self.process.poll()})")

    def receive(self):
        try:
            status, packed = self.conn.recv()
        except (EOFError, OSError) as e:
            raise self._stopped() from e
        if status == 'error':
            raise RuntimeError(f"a supernet worker process failed:\n{packed}")
        return _unpack(packed, self.shm.buf, copy=True)

    def _close_segment(self):
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()
            self.shm = None

    def stop(self, kill=False):
        """End the process: asked to (it finishes a call in progress first), or killed (after
        a failure, when a call in progress is of no use). Its peak memory is kept."""
        global _STOPPED_PEAK_KB
        _STOPPED_PEAK_KB = max(_STOPPED_PEAK_KB, _peak_kb(self.process.pid))
        if not kill:
            try:
                self.conn.send(None)
                self.process.wait(timeout=10)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                kill = True
        if kill:
            self.process.kill()
            self.process.wait()
        self.conn.close()
        self._close_segment()


def _arrays(obj):
    """The numpy arrays in obj (dicts, lists, tuples walked)."""
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _arrays(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _arrays(v)


def map_processes(fn, calls):
    """[fn(*args) for args in calls]: the first call here, call i in worker process i.
    Exceptions propagate (a worker's as RuntimeError with its traceback)."""
    calls = list(calls)
    if len(calls) < 2:
        return [fn(*args) for args in calls]
    with _LOCK:
        while len(_WORKERS) < len(calls) - 1:
            _WORKERS.append(_Worker())
        workers = _WORKERS[:len(calls) - 1]
        try:
            for w, args in zip(workers, calls[1:]):
                w.send(fn, args)
            first = fn(*calls[0])
            return [first] + [w.receive() for w in workers]
        except BaseException:
            _stop_all(kill=True)
            raise


def _stop_all(kill=False):
    while _WORKERS:
        _WORKERS.pop().stop(kill)


def stop_workers():
    """Stop every worker process (they start again when next needed)."""
    with _LOCK:
        _stop_all()


def worker_pids():
    """The process ids of the running workers."""
    return [w.process.pid for w in _WORKERS]


_STOPPED_PEAK_KB = 0


def _peak_kb(pid):
    """Peak resident memory of process pid in KiB (Linux's VmHWM; 0 where unknown)."""
    try:
        with open(f'/proc/{pid}/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_mb():
    """Peak resident memory of the worker processes in MB: the sum of the running ones'
    peaks, or the largest peak of those stopped, whichever is more (Linux; 0 elsewhere)."""
    running = sum(_peak_kb(w.process.pid) for w in _WORKERS)
    return max(running, _STOPPED_PEAK_KB) / 1024


atexit.register(stop_workers)
