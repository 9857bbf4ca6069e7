"""Worker processes: CPU work that runs side by side without sharing Python's GIL.

Why. numpy releases the GIL inside each kernel, so threads can run numpy side by side,
but a classifier pass is hundreds of short kernels, and between two of them a thread
must take the GIL back: with two threads busy, every hand-over is a thread wake-up.
On the 2-core VM of this project two threads each running a 64-image classifier shard
took 1.33-1.53x the time of one shard alone, two processes 1.11-1.13x
(results/threads-vs-processes.txt). So the classifier's shards run in worker
processes; the optimizer and the generator, whose arrays live in this process, stay on
threads (nn.backend.parallel_map).

How. `map_processes(fn, calls)` runs fn(*calls[0]) here and fn(*calls[i]) in worker
i (a fresh interpreter with this process's sys.path, started on first use, then
kept; POSIX only: elsewhere nn.backend.map_shards uses threads). fn must be a
function defined at the top level of an importable module (not __main__): it is sent
by name. Each worker has a socket and a shared-memory segment: the large numpy arrays
(exactly np.ndarray) of a call's arguments are copied into the segment and given to fn
as READ-ONLY views, valid during the call only; the worker writes the large arrays of
its result after them, and the caller copies them out. Everything else is pickled
through the socket (so an argument fn changes in place is not changed here). The
results are the numbers fn gives in this process (same code, same single-threaded BLAS).

Failures. A worker ignores Ctrl-C (the caller handles it). Any exception while a call
is out (in a worker, in fn here, Ctrl-C, a worker that died) stops every worker; they
start again on the next call. Every call carries a number that its reply repeats, so a
reply to an earlier call is never taken for this one. A worker's exception comes back
as a RuntimeError carrying its traceback.
"""
import atexit
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing import shared_memory
from multiprocessing.connection import Connection

import numpy as np

_LARGE = 1 << 14        # bytes: arrays at least this big go through shared memory
_SPIN_S = 1e-3          # seconds the caller polls for a reply before it sleeps on the socket
                        # (woken from a sleep it sees the reply later): the step 0.95-0.98x at
                        # batch 20, within 1-2% at 128 to 8x64 (results/spin-receive.txt)
_ALIGN = 64             # byte alignment of each array in a segment (a cache line)

_WORKERS = []           # [_Worker], started on demand
_LOCK = threading.Lock()
_BUSY = threading.local()           # .active: this thread is inside map_processes
_CWD = os.getcwd()                  # relative sys.path entries are resolved against this
                                    # (nn.backend imports this module: the directory at start-up)

# glibc's malloc in a fresh worker gave the freed memory of each classifier pass back
# to the system and page-faulted it in again on the next (4,600 faults, 18 MB, per
# 64-image pass: the worker's pass took twice the caller's). Keeping freed memory
# (arrays under 32 MB from the heap, up to 512 MB of it kept) removes that. Other C
# libraries ignore these variables; a value the user set wins.
_MALLOC_ENV = {'MALLOC_MMAP_THRESHOLD_': str(32 << 20), 'MALLOC_TRIM_THRESHOLD_': str(512 << 20)}

# A worker's first lines: Ctrl-C ignored before anything else, then exactly the caller's
# sys.path (python -c would put the worker's own working directory first, where another
# supernet.py could be found), then the loop.
_BOOT = ("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); import sys, os; "
         "sys.path[:] = sys.argv[2].split(os.pathsep); "
         "from nn.workers import _worker_main; _worker_main(int(sys.argv[1]))")


class _Ref:
    """An array in a worker's shared segment: where it is and what it looks like."""
    __slots__ = ('offset', 'shape', 'dtype')

    def __init__(self, offset, shape, dtype):
        self.offset, self.shape, self.dtype = offset, shape, dtype


def _pack(obj, buf, offset):
    """obj with its large numpy arrays copied into buf from byte `offset` on and replaced
    by _Refs; arrays that do not fit stay in obj (they are then pickled). Walks dicts,
    lists and tuples (exactly those types; anything else is pickled whole).
    -> (packed obj, first free offset)."""
    if type(obj) is np.ndarray and obj.nbytes >= _LARGE and not obj.dtype.hasobject:
        start = -(-offset // _ALIGN) * _ALIGN
        if start + obj.nbytes <= len(buf):
            np.ndarray(obj.shape, obj.dtype, buffer=buf, offset=start)[...] = obj
            return _Ref(start, obj.shape, obj.dtype), start + obj.nbytes
        return obj, offset
    if type(obj) is dict:
        out = {}
        for k, v in obj.items():
            out[k], offset = _pack(v, buf, offset)
        return out, offset
    if type(obj) in (list, tuple):
        items = []
        for v in obj:
            p, offset = _pack(v, buf, offset)
            items.append(p)
        return type(obj)(items), offset
    return obj, offset


def _unpack(obj, buf, copy):
    """The inverse of _pack: _Refs become arrays, read-only views of buf (copy=False) or
    copies."""
    if isinstance(obj, _Ref):
        a = np.ndarray(obj.shape, obj.dtype, buffer=buf, offset=obj.offset)
        if copy:
            return a.copy()
        a.flags.writeable = False
        return a
    if type(obj) is dict:
        return {k: _unpack(v, buf, copy) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_unpack(v, buf, copy) for v in obj)
    return obj


def _attach(name):
    """Open the caller's segment without registering it with a resource tracker (the
    caller owns it and unlinks it; Python < 3.13 has no track=False, and registering
    would start a tracker process in every worker)."""
    try:
        return shared_memory.SharedMemory(name=name, track=False)
    except TypeError:
        from multiprocessing import resource_tracker
        register = resource_tracker.register
        resource_tracker.register = lambda *args: None       # this worker process only
        try:
            return shared_memory.SharedMemory(name=name)
        finally:
            resource_tracker.register = register


def _worker_main(fd):
    """A worker's loop on socket fd: (call number, segment name, fn, packed args) in,
    (call number, 'ok', packed result) or (call number, 'error', traceback) out; None,
    or the caller gone, ends it."""
    conn = Connection(fd)
    from .backend import set_num_threads
    set_num_threads(1)                          # one thread here, BLAS included
    shm = None
    try:
        while True:
            try:
                msg = conn.recv_bytes()
            except (EOFError, OSError):
                return
            seq = None
            try:
                msg = pickle.loads(msg)             # here, so that an unknown fn is an error reply
                if msg is None:
                    return
                seq, name, fn, packed, free = msg
                if shm is None or shm.name != name:
                    if shm is not None:
                        shm.close()
                    shm = _attach(name)
                result = fn(*_unpack(packed, shm.buf, copy=False))
                reply = pickle.dumps((seq, 'ok', _pack(result, shm.buf, free)[0]))
                del result
            except BaseException:
                reply = pickle.dumps((seq, 'error', traceback.format_exc()))
            try:
                conn.send_bytes(reply)
            except OSError:
                return
            del reply
    finally:
        if shm is not None:
            shm.close()


def _worker_path():
    """The caller's sys.path, relative entries made absolute (against the directory this
    module was imported from), for the worker to use as its own."""
    return os.pathsep.join(os.path.normpath(os.path.join(_CWD, p)) for p in sys.path)


class _Worker:
    """A worker process and the caller's end of its socket and segment. Started as a fresh
    interpreter (`python -c`, not multiprocessing's spawn, which would import the caller's
    main script again in the worker, so that a script without a __main__ guard ran twice)."""

    def __init__(self):
        here, there = socket.socketpair()
        env = dict(os.environ)
        for k, v in _MALLOC_ENV.items():
            env.setdefault(k, v)
        cmd = [sys.executable, *subprocess._args_from_interpreter_flags(), '-c', _BOOT,
               str(there.fileno()), _worker_path()]
        self.process = subprocess.Popen(cmd, pass_fds=(there.fileno(),), env=env, stdin=subprocess.DEVNULL)
        there.close()
        self.conn = Connection(here.detach())
        self.shm = None
        self.seq = 0

    def send(self, fn, args):
        need = sum(a.nbytes + _ALIGN for a in _arrays(args) if a.nbytes >= _LARGE)
        if self.shm is None or self.shm.size < 2 * need:     # room for the result after the args
            self._close_segment()
            self.shm = shared_memory.SharedMemory(create=True, size=max(1 << 20, 4 * need))
        packed, free = _pack(args, self.shm.buf, 0)
        self.seq += 1
        data = pickle.dumps((self.seq, self.shm.name, fn, packed, free))
        try:
            self.conn.send_bytes(data)
        except OSError as e:
            raise self._stopped() from e

    def receive(self):
        """The reply to the last call sent (replies to earlier calls are skipped)."""
        end = time.perf_counter() + _SPIN_S
        try:
            while time.perf_counter() < end and not self.conn.poll(0):
                pass
        except (EOFError, OSError):             # the recv below reports it
            pass
        while True:
            try:
                seq, status, packed = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError) as e:
                raise self._stopped() from e
            if seq == self.seq or seq is None:
                break
        if status == 'error':
            raise RuntimeError(f"a supernet worker process failed:\n{packed}")
        return _unpack(packed, self.shm.buf, copy=True)

    def _stopped(self):
        try:
            code = self.process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            code = None
        return RuntimeError(f"a supernet worker process stopped unexpectedly (exit code {code}; "
                            "its error, if any, is on standard error above)")

    def _close_segment(self):
        if self.shm is not None:
            shm, self.shm = self.shm, None
            shm.close()
            try:
                shm.unlink()
            except FileNotFoundError:           # already removed (e.g. by the system at logout):
                from multiprocessing import resource_tracker      # forget it here too
                resource_tracker.unregister(shm._name, 'shared_memory')

    def stop(self, kill=False):
        """End the process: asked to (it finishes a call in progress first), or killed (after
        a failure, when a call in progress is of no use). Its peak memory is kept.
        Every step is tried, whatever the earlier ones raised."""
        global _STOPPED_PEAK_KB
        _STOPPED_PEAK_KB = max(_STOPPED_PEAK_KB, _peak_kb(self.process.pid))
        try:
            if not kill:
                try:
                    self.conn.send_bytes(pickle.dumps(None))
                    self.process.wait(timeout=10)
                except (OSError, ValueError, subprocess.TimeoutExpired):
                    kill = True
            if kill:
                self.process.kill()
                self.process.wait()
        finally:
            try:
                self.conn.close()
            finally:
                self._close_segment()


def _arrays(obj):
    """The numpy arrays that _pack may put in a segment (dicts, lists, tuples walked)."""
    if type(obj) is np.ndarray:
        yield obj
    elif type(obj) is dict:
        for v in obj.values():
            yield from _arrays(v)
    elif type(obj) in (list, tuple):
        for v in obj:
            yield from _arrays(v)


def map_processes(fn, calls):
    """[fn(*args) for args in calls]: the first call here, call i in worker process i.
    Exceptions propagate (a worker's as RuntimeError with its traceback). Called again
    from inside fn (in this process), it runs its calls here, one after the other."""
    calls = list(calls)
    if len(calls) < 2 or getattr(_BUSY, 'active', False):
        return [fn(*args) for args in calls]
    if getattr(fn, '__module__', None) in (None, '__main__') or '<' in getattr(fn, '__qualname__', '<'):
        raise ValueError(f"map_processes: {fn!r} cannot be sent to a worker by name: use a function "
                         "defined at the top level of an importable module (not __main__, not a lambda)")
    with _LOCK:
        _BUSY.active = True
        try:
            for i, w in enumerate(_WORKERS):
                if w.process.poll() is not None:          # died while idle: start another
                    w.stop(kill=True)
                    _WORKERS[i] = _Worker()
            while len(_WORKERS) < len(calls) - 1:
                _WORKERS.append(_Worker())
            workers = _WORKERS[:len(calls) - 1]
            for w, args in zip(workers, calls[1:]):
                w.send(fn, args)
            first = fn(*calls[0])
            return [first] + [w.receive() for w in workers]
        except BaseException:
            try:
                _stop_all(kill=True)
            except Exception:               # noqa: BLE001 -- the first error is the one to see
                pass
            raise
        finally:
            _BUSY.active = False


def _stop_all(kill=False):
    """Stop every worker; the first error met is raised after all have been tried."""
    workers, _WORKERS[:] = _WORKERS[:], []
    error = None
    for w in workers:
        try:
            w.stop(kill)
        except BaseException as e:          # noqa: BLE001 -- stop the others first
            error = error or e
    if error is not None:
        raise error


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
    peaks, or the largest peak of those stopped, whichever is more (Linux; 0 elsewhere).
    Approximate: shared-segment pages count in both processes."""
    running = sum(_peak_kb(w.process.pid) for w in _WORKERS)
    return max(running, _STOPPED_PEAK_KB) / 1024


atexit.register(stop_workers)
