"""Worker processes (nn/workers.py): the classifier's shards in other processes give the
thread pool's numbers bit for bit; arrays travel through shared memory intact; a failure
in a worker, a dead worker or an unpicklable function is a clear error and the next call
works; workers stop with the thread count, ignore Ctrl-C and count in the peak memory."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import supernet as S
from nn import backend, workers
from tests import workers_helpers as H

pytestmark = pytest.mark.skipif(os.name != 'posix', reason='worker processes are POSIX only (threads elsewhere)')
ROOT = Path(__file__).resolve().parents[1]
CFG = S.Config(n_tasks=6)


@pytest.fixture
def kind():
    """Set the shard workers' kind for one test: kind('threads' | 'processes'); restored after."""
    old = backend.get_shard_workers()
    yield backend.set_shard_workers
    backend.set_shard_workers(old)


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
@pytest.mark.parametrize('G,m,n', [(1, 40, 2), (4, 1, 2), (2, 7, 3), (3, 12, 3)])
def test_processes_give_the_threads_bits(kind, monkeypatch, dtype, G, m, n):
    monkeypatch.setattr(S, '_MIN_SHARD', {'processes': 1, 'threads': 1})
    r = np.random.default_rng(G * 10 + m)
    p = S.init_params(CFG, dtype=dtype)
    p['z'] = r.normal(size=p['z'].shape).astype(dtype)
    x = r.normal(size=(G, m, 32, 32, 3)).astype(dtype)
    y = (r.random((G, m)) > 0.5).astype(dtype)
    backend.set_num_threads(n)
    out = {}
    for k in ('threads', 'processes'):
        kind(k)
        out[k] = S.loss_and_grads(p, x, y, list(range(G)), CFG)
    assert len(workers.worker_pids()) == n - 1                     # the processes did the shards
    (l1, g1, z1), (l2, g2, z2) = out.values()
    assert l1 == l2 and np.array_equal(z1, z2) and set(g1) == set(g2)
    for k in g1:
        assert g1[k].dtype == g2[k].dtype == dtype and np.array_equal(g1[k], g2[k]), k


def test_arrays_cross_intact(kind):
    backend.set_num_threads(2)
    r = np.random.default_rng(0)
    big = r.normal(size=(64, 130, 3)).astype(np.float32)[:, ::2]   # large and not contiguous
    small = np.arange(5)
    _, res = workers.map_processes(H.summary, [(big, {'small': small, 'v': [big]}),
                                                   (big, {'small': small, 'v': (big, 1)})])
    assert res['sum'] == np.ascontiguousarray(big).sum() and res['shape'] == big.shape and res['dtype'] == 'float32'
    assert res['c'] is True                                         # a contiguous copy in the segment
    assert np.array_equal(res['twice'], 2 * big) and res['keys'] == ['small', 'v']
    assert np.array_equal(res['small'], small + 1)
    # bigger arguments than the segment holds: it is replaced by a larger one
    huge = np.ones(3 << 20, np.float32)
    assert workers.map_processes(H.summary, [(huge, {'small': 0}), (huge, {'small': 0})])[1]['sum'] == 3 << 20
    # a large result with no room left in the segment comes back pickled
    assert workers.map_processes(H.zeros, [(8,), (10 << 20,)])[1].shape == (10 << 20,)


def test_failures_are_clear_and_the_next_call_works(kind):
    backend.set_num_threads(2)
    with pytest.raises(RuntimeError, match=r"worker process failed:(.|\n)*ValueError: boom in the worker"):
        workers.map_processes(H.fail_if, [(0,), (1,)])
    assert workers.worker_pids() == []                              # stopped after the failure
    assert workers.map_processes(H.echo, [(1,), (2,)]) == [(1,), (2,)]
    with pytest.raises(RuntimeError, match='stopped unexpectedly'):
        workers.map_processes(H.die_if, [(0,), (1,)])
    assert workers.map_processes(H.echo, [(1,), (2,)]) == [(1,), (2,)]
    with pytest.raises(ValueError, match='cannot be sent to a worker by name'):
        workers.map_processes(lambda a: a, [(1,), (2,)])            # a lambda: refused before anything starts
    with pytest.raises(RuntimeError, match='read-only'):            # arguments are read-only views
        workers.map_processes(H.add_one_in_place, [(np.zeros(8192),), (np.zeros(8192),)])
    assert workers.map_processes(H.echo, [(1,), (2,)]) == [(1,), (2,)]
    with pytest.raises(ValueError, match='here'):                   # an error in the caller's own share
        workers.map_processes(H.fail, [('here',), ('there',)])
    assert workers.worker_pids() == []


def test_workers_stop_with_the_thread_count_and_free_their_memory(kind):
    backend.set_num_threads(3)
    workers.map_processes(H.echo, [(1,), (2,), (3,)])
    pids = workers.worker_pids()
    segments = [w.shm.name for w in workers._WORKERS]
    assert len(pids) == 2
    if sys.platform == 'linux':
        assert workers.peak_rss_mb() > 0
    backend.set_num_threads(1)
    assert workers.worker_pids() == []
    for p in pids:                                                  # the processes are gone
        with pytest.raises(ProcessLookupError):
            os.kill(p, 0)
    if os.path.isdir('/dev/shm'):                                   # and their segments unlinked
        assert not any(os.path.exists(f'/dev/shm/{n}') for n in segments)
    if sys.platform == 'linux':
        assert workers.peak_rss_mb() > 0                            # a stopped worker's peak is kept


def test_a_worker_ignores_ctrl_c(kind):
    backend.set_num_threads(2)
    workers.map_processes(H.echo, [(1,), (2,)])
    (pid,) = workers.worker_pids()
    os.kill(pid, signal.SIGINT)
    time.sleep(0.2)
    assert workers.map_processes(H.pid, [(), ()])[1] == pid         # the same worker answers


def test_a_script_without_a_main_guard_runs_once(tmp_path):
    """Workers are fresh interpreters: the caller's script is not imported again in them."""
    script = tmp_path / 'unguarded.py'
    script.write_text(
        "import numpy as np\n"
        "import supernet as S\n"
        "from nn import backend, workers\n"
        "backend.set_num_threads(2)\n"
        "cfg = S.Config(n_tasks=3)\n"
        "p = S.init_params(cfg)\n"
        "r = np.random.default_rng(0)\n"
        "x = r.normal(size=(1, 40, 32, 32, 3)).astype(np.float32)\n"
        "y = (r.random((1, 40)) > 0.5).astype(np.float32)\n"
        "loss = S.loss_and_grads(p, x, y, [0], cfg)[0]\n"
        "print('ran', len(workers.worker_pids()), float(loss) > 0)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), SUPERNET_WORKERS='processes')
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ['ran', '1', 'True']


def test_a_wrong_supernet_workers_value_is_a_clear_error():
    env = dict(os.environ, PYTHONPATH=str(ROOT), SUPERNET_WORKERS='forks')
    out = subprocess.run([sys.executable, '-c', 'import nn.backend'], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode != 0 and "SUPERNET_WORKERS must be 'processes' or 'threads', got 'forks'" in out.stderr
    with pytest.raises(ValueError, match="'processes' or 'threads'"):
        backend.set_shard_workers('forks')


def test_ctrl_c_in_the_caller_while_a_worker_computes(kind):
    backend.set_num_threads(2)
    workers.map_processes(H.echo, [(1,), (2,)])
    segment = workers._WORKERS[0].shm.name
    with pytest.raises(KeyboardInterrupt):
        workers.map_processes(H.interrupt_if_0, [(0,), (1,)])
    assert workers.worker_pids() == []                              # killed, not left computing
    if os.path.isdir('/dev/shm'):
        assert not os.path.exists(f'/dev/shm/{segment}')
    assert workers.map_processes(H.echo, [(1,), (2,)]) == [(1,), (2,)]


def test_a_reply_to_an_earlier_call_is_never_taken_for_a_later_one(kind):
    backend.set_num_threads(2)
    workers.map_processes(H.echo, [(0,), (0,)])
    w = workers._WORKERS[0]
    w.send(H.echo, ('old',))                                        # its reply is never read
    w.send(H.echo, ('new',))
    assert w.receive() == ('new',)
    workers.stop_workers()


def test_a_segment_removed_behind_our_back_stops_cleanly(kind):
    if not os.path.isdir('/dev/shm'):
        pytest.skip('no /dev/shm here')
    backend.set_num_threads(2)
    workers.map_processes(H.echo, [(0,), (0,)])
    os.unlink(f'/dev/shm/{workers._WORKERS[0].shm.name}')          # as systemd does at logout (RemoveIPC)
    workers.stop_workers()
    assert workers.worker_pids() == []
    assert workers.map_processes(H.echo, [(1,), (2,)]) == [(1,), (2,)]


def test_workers_import_the_callers_code_not_their_working_directorys(tmp_path):
    """A supernet.py in the working directory is not the one the caller imported: the
    worker takes the caller's sys.path, not python -c's working directory first."""
    (tmp_path / 'supernet.py').write_text("raise ImportError('the decoy was imported')\n")
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "from nn import backend, workers\n"
            "from tests import workers_helpers as H\n"
            "backend.set_num_threads(2)\n"
            "print(*workers.map_processes(H.module_file, [(), ()]))\n")
    env = dict(os.environ, PYTHONPATH='')
    out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    here, there = out.stdout.split()
    assert here == there == str(ROOT / 'supernet.py')
