"""bench.py: a quick run produces a well-formed table and JSON (no timing assertions), the
instrumented step is the real step, the FLOP count, the GPU error; and, where PyTorch is
installed, the PyTorch oracle agrees with our hand-written gradients in float64 (and a
wrong gradient is caught). Also the blocked (many-block) conv path, which only large
batches reach, against the one-block path and against PyTorch."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import bench
import supernet as S
from nn import layers as L
from nn.gradcheck import check_gradient, rel_error
from tests.cli import usage_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _numbers(d):
    """Every number in a nested JSON structure."""
    if isinstance(d, dict):
        for v in d.values():
            yield from _numbers(v)
    elif isinstance(d, list):
        for v in d:
            yield from _numbers(v)
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        yield d


def test_quick_run_from_the_command_line(tmp_path):
    path = tmp_path / 'bench.json'
    cmd = [sys.executable, 'bench.py', '--quick', '--threads', '2', '--batches', '4', '40',
           '--mixed', '2', '3', '--json', str(path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for text in ('GFLOP/s', 'ms/step', 'B=4', 'B=40', '2x3', 'images/s ratio', 'per-part breakdown',
                 'conv2 backward', 'optimizer (rmsprop)', 'peak memory',
                 '2 threads (classifier shards in worker '):
        assert text in out, text
    res = json.loads(path.read_text())
    assert res['machine']['threads'] == 2
    assert res['machine']['matmul_gflops'] > 0 and res['machine']['copy_gbps'] > 0
    assert res['machine']['conv_matmul_gflops'] > 0 and res['machine']['conv_matmul_shape'] == [640, 400, 16]
    assert 'conv-shaped 640x400 @ 400x16' in out
    assert res['machine']['gpu'] is None and res['machine']['cpu']      # the machine is named
    assert f"machine: cpu ({res['machine']['cpu']})" in out
    assert [s['name'] for s in res['steps']] == ['B=4', 'B=40', '2x3']
    for s in res['steps']:
        assert s['ms'] > 0 and s['images_per_s'] > 0 and 0 < s['peak_fraction'] and s['loss_finite']
        assert s['images'] == s['tasks'] * s['per_task']
        parts = res['breakdown'][s['name']]
        assert set(parts) >= {'generator forward', 'conv1 forward', 'conv4 forward', 'conv4 backward',
                              'conv1 backward', 'leaky ReLU forward (all)', 'leaky ReLU backward (all)',
                              'generator backward', 'optimizer (rmsprop)'}
        assert all(v > 0 for k, v in parts.items() if not k.startswith('other'))
        assert res['memory'][s['name']]['step_peak_mb'] > 0
    mv = res['mixed_vs_single']
    assert mv['images_per_s_ratio'] == pytest.approx(mv['one_task_steps_ms'] / mv['mixed_step_ms'])
    assert all(math.isfinite(v) for v in _numbers(res))
    assert 'torch' not in res['machine'] and 'torch_check' not in res


def test_part_timer_times_the_real_step_and_restores_it():
    """The breakdown wraps the functions the step calls: the step's results are unchanged,
    every conv layer is named, and the module functions are restored afterwards."""
    cfg = S.Config(n_tasks=98)
    b = bench.Bench(cfg, 2, 3, np)
    loss, grads, _ = S.loss_and_grads(b.params, b.x, b.y, b.tasks, cfg)
    originals = (S.generator_forward, L.conv_forward, L.conv_backward, L.leaky_relu_backward)
    with bench.PartTimer(cfg, np, b.opt) as pt:
        assert L.conv_forward is not originals[1]
        pt.start_step()
        loss2, grads2, _ = S.loss_and_grads(b.params, b.x, b.y, b.tasks, cfg)
        pt.end_step(keep=True)
    assert (S.generator_forward, L.conv_forward, L.conv_backward, L.leaky_relu_backward) == originals
    assert 'step' not in vars(b.opt)                       # the instance attribute is gone again
    assert float(loss) == float(loss2)
    for k in grads:
        assert np.array_equal(grads[k], grads2[k]), k
    parts = pt.medians()
    assert [k for k in parts if k.startswith('conv')] == [
        'conv1 forward', 'conv2 forward', 'conv3 forward', 'conv4 forward',
        'conv4 backward', 'conv3 backward', 'conv2 backward', 'conv1 backward']
    assert 'optimizer (rmsprop)' not in parts               # loss_and_grads alone: no update


def test_part_timer_counts_nested_calls_once_and_restores_on_error():
    """With hidden generator layers the generator calls leaky ReLU itself: that time is
    the generator's, not the activations'. An error inside the step still restores the
    wrapped functions."""
    cfg = S.Config(image_shape=(8, 8, 3), conv_filters=(3, 4), kernel=3, fc=(5,), z_dim=6, n_tasks=4,
                   gen_hidden=(7,))
    b = bench.Bench(cfg, 1, 3, np)
    calls = []
    real = L.leaky_relu_forward
    with bench.PartTimer(cfg, np, b.opt) as pt:
        pt.start_step()
        S.generator_forward(b.params['z'][:1], b.params, cfg)      # calls leaky ReLU inside
        pt.end_step(keep=True)
        assert list(pt.laps) == ['generator forward', 'other (fc layers, loss, split/merge, z rows)']
        pt.start_step()
        b.step()
        pt.end_step(keep=True)
        calls = list(pt.laps)
    assert 'leaky ReLU forward (all)' in calls and 'conv2 backward' in calls and 'conv3 forward' not in calls
    with pytest.raises(ZeroDivisionError):
        with bench.PartTimer(cfg, np, b.opt):
            1 / 0
    assert L.leaky_relu_forward is real and 'step' not in vars(b.opt)


def _usage_error(capsys, argv, parse=bench.parse_args):
    """The one-line argparse error that argv gets (exit status 2, no traceback)."""
    return usage_error(capsys, parse, argv)


def test_threads_flag_is_checked(capsys):
    from nn.backend import usable_cpus
    cpus = usable_cpus()
    assert '--threads must be >= 0' in _usage_error(capsys, ['--threads', '-2'])
    assert _usage_error(capsys, ['--threads', '100000']) == \
        f"bench.py: error: --threads 100000: this machine has {cpus} usable CPU{'s' * (cpus != 1)}"
    assert f'--threads {cpus + 1}:' in _usage_error(capsys, ['--threads', str(cpus + 1)])
    assert bench.parse_args(['--threads', str(cpus)]).threads == cpus
    assert bench.parse_args([]).threads == 0                      # 0: every usable CPU


@pytest.mark.parametrize('argv,message', [
    (['--batches', '0'], "argument --batches: must be >= 1, got 0"),
    (['--batches', '20', '-4'], "argument --batches: must be >= 1, got -4"),
    (['--batches', '1.5'], "argument --batches: '1.5' is not an integer"),
    (['--mixed', '0', '64'], "argument --mixed: must be >= 1, got 0"),
    (['--mixed', '8', '0'], "argument --mixed: must be >= 1, got 0"),
    (['--mixed', '99', '2'], "--mixed 99 2: there are only 98 tasks"),
    (['--batches', '20', '20'], "--batches/--mixed: step B=20 is given twice"),
    (['--batches', '64', '--mixed', '1', '64'], "--batches/--mixed: step B=64 is given twice"),
])
def test_step_options_are_checked(capsys, argv, message):
    assert _usage_error(capsys, argv).endswith(message)


def test_mixed_step_may_use_every_task_and_a_batch_of_its_total():
    args = bench.parse_args(['--batches', '512', '--mixed', '98', '1'])
    assert args.batches == [512] and args.mixed == [98, 1]
    b = bench.Bench(S.Config(n_tasks=bench.N_TASKS), 98, 1, np)
    assert len(set(b.tasks.tolist())) == 98                            # distinct tasks


def test_json_path_is_checked_before_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, 'run', lambda *a: pytest.fail('the benchmark ran'))
    assert _usage_error(capsys, ['--json', str(tmp_path)], bench.main).endswith(
        f'--json {tmp_path}: is a directory')
    path = tmp_path / 'missing' / 'b.json'
    assert _usage_error(capsys, ['--json', str(path)], bench.main).endswith(
        f'--json {path}: {path.parent} is not an existing folder')
    (tmp_path / 'file').write_text('kept')
    path = tmp_path / 'file' / 'b.json'
    assert _usage_error(capsys, ['--json', str(path)], bench.main).endswith('is not an existing folder')
    assert (tmp_path / 'file').read_text() == 'kept'
    assert bench.parse_args(['--json', str(tmp_path / 'b.json')]).json == str(tmp_path / 'b.json')


def test_missing_torch_is_reported_before_the_run(capsys, monkeypatch):
    def no_torch():
        raise RuntimeError('--vs-torch needs PyTorch (pip install torch)')
    monkeypatch.setattr(bench, 'torch_module', no_torch)
    monkeypatch.setattr(bench, 'run', lambda *a: pytest.fail('the benchmark ran'))
    assert _usage_error(capsys, ['--quick', '--vs-torch'], bench.main) == \
        'bench.py: error: --vs-torch needs PyTorch (pip install torch)'


def test_flop_count_of_the_original_classifier():
    cfg = S.Config()
    f = bench.step_flops(cfg, 1, 1)
    conv = 2 * (16 * 16 * 75 * 16 + 8 * 8 * 400 * 16 + 4 * 4 * 400 * 16 + 2 * 2 * 400 * 16)
    fc = 2 * (64 * 100 + 100 * 100 + 100 * 1)
    assert f["classifier_fwd"] == conv + fc == 1722600
    first = 2 * 16 * 16 * 75 * 16                       # conv1 needs no input gradient
    assert f['classifier_bwd'] == 2 * conv - first + 2 * fc
    assert f['generator'] == 3 * 2 * 100 * 37165
    assert bench.step_flops(cfg, 8, 64)['total'] == 8 * 64 * (f['classifier_fwd'] + f['classifier_bwd']) + 8 * f['generator']


def test_gpu_request_fails_clearly(capsys, monkeypatch):
    try:
        import cupy  # noqa: F401
        pytest.skip('cupy is installed')
    except ImportError:
        pass
    monkeypatch.setattr(bench, 'run', lambda *a: pytest.fail('the benchmark ran'))
    err = _usage_error(capsys, ['--device', 'gpu', '--quick'], bench.main)
    assert err.startswith('bench.py: error: --device gpu needs CuPy, which is not installed')


def test_gpu_path_runs_on_the_strict_device(monkeypatch, capsys):
    """bench's --device gpu path (run + print_table) on the strict CuPy stand-in: every
    array it makes stays on the 'device' (a host array or np. call would raise MixError),
    and the step's memory comes from the device pool (here a stand-in pool that checks
    it is emptied before the step and read after it), not from tracemalloc."""
    from tests.strict_xp import strict

    class Pool:
        calls = []

        def free_all_blocks(self):
            self.calls.append('free')

        def total_bytes(self):
            self.calls.append('total')
            return 3 << 20

    pool = Pool()
    monkeypatch.setattr(strict, 'get_default_memory_pool', lambda: pool, raising=False)
    real_step = bench.Bench.step
    monkeypatch.setattr(bench.Bench, 'step', lambda self: (pool.calls.append('step'), real_step(self))[1])
    args = bench.parse_args(['--quick', '--device', 'gpu', '--batches', '3', '--mixed', '2', '2'])
    res = bench.run(args, strict)
    bench.print_table(res)
    out = capsys.readouterr().out
    assert [s['name'] for s in res['steps']] == ['B=3', '2x2'] and all(s['loss_finite'] for s in res['steps'])
    assert res['machine']['threads'] == 1                 # no CPU thread pool on a device
    for name in ('B=3', '2x2'):
        mem = res['memory'][name]
        assert mem['step_peak_mb'] is None and mem['device_pool_mb'] == 3
    # each step shape's peak_memory: the pool emptied, one step, the pool read
    frees = [i for i, c in enumerate(pool.calls) if c == 'free']
    assert len(frees) == 2 and pool.calls.count('total') == 2
    assert all(pool.calls[i + 1:i + 3] == ['step', 'total'] for i in frees)
    assert 'device pool 3.0 MB' in out and 'machine: gpu' in out


# --------------------------------------------------------------------------- conv paths
# The benchmark's shapes take conv paths the small layer tests barely reach: many image
# blocks (large batches, CPU) and dw from the windows of d (F <= C, conv2-4).

CONV_PATH_CASES = [  # x, w, pad, stride
    ((2, 5, 9, 9, 3), (2, 5, 5, 3, 4), 'SAME', 2),        # F > C: dw from im2col(x)
    ((2, 3, 8, 8, 4), (2, 5, 5, 4, 4), 'SAME', 2),        # F = C: dw from the windows of d
    ((5, 8, 7, 3), (3, 2, 3, 2), ((0, 1), (2, 0)), 1),    # F < C, stride 1, asymmetric padding
    ((4, 9, 9, 4), (2, 2, 4, 3), 'VALID', 3),             # stride > kernel: pixels no tap reaches
    ((2, 10, 11, 3), (4, 4, 3, 5), 'SAME', 3),            # stride 3, even kernel, SAME's uneven padding
]


@pytest.mark.parametrize('case', CONV_PATH_CASES)
def test_conv_paths_gradcheck(case):
    shape_x, shape_w, pad, stride = case
    r = np.random.default_rng(3)
    x, w = r.normal(size=shape_x), r.normal(size=shape_w)
    b = r.normal(size=shape_w[:-4] + shape_w[-1:])
    out, cache = L.conv_forward(x, w, b, stride, pad)
    dout = r.normal(size=out.shape)
    dx, dw, db = L.conv_backward(dout, cache)
    f = lambda: L.conv_forward(x, w, b, stride, pad)[0]
    for arr, grad in [(x, dx), (w, dw), (b, db)]:
        assert check_gradient(f, arr, grad, dout) < 1e-8      # float64: 1e-11..3e-10 when right
    _, dw2, db2 = L.conv_backward(dout, cache, need_dx=False)
    assert np.array_equal(dw, dw2) and np.array_equal(db, db2)


@pytest.mark.parametrize('case', CONV_PATH_CASES)
def test_blocked_conv_equals_one_block(monkeypatch, case):
    """Large batches run the conv in many image blocks (CPU); small ones (the gradient
    checks) in one. Both must give the same numbers, grouped and not."""
    r = np.random.default_rng(0)
    for shape_x, shape_w, pad, stride in [case]:
        x, w = r.normal(size=shape_x), r.normal(size=shape_w)
        b = r.normal(size=shape_w[:-4] + shape_w[-1:])
        results = []
        for block_bytes in (1 << 40, 1):                # one block; one image per block
            monkeypatch.setattr(L, '_BLOCK_BYTES', block_bytes)
            out, cache = L.conv_forward(x, w, b, stride, pad)
            dout = np.random.default_rng(1).normal(size=out.shape)
            results.append((out,) + L.conv_backward(dout, cache))
        for a, e in zip(*results):
            assert rel_error(a, e) < 1e-13


def _conv_results(x, w, b, stride, pad):
    out, cache = L.conv_forward(x, w, b, stride, pad)
    dout = np.random.default_rng(1).normal(size=out.shape)
    return (out,) + L.conv_backward(dout, cache)


@pytest.mark.parametrize('case', CONV_PATH_CASES)
def test_products_cut_into_row_blocks_equal_whole_ones(monkeypatch, case):
    """On the CPU long products are cut into row blocks under _SMALL_GEMM_MNK multiply-adds
    (nn.layers._mm, _mm_tn). Cut small here, so that products of these small cases are cut
    too: the same numbers as whole products (gradient-checked in test_conv_paths_gradcheck)
    to rounding."""
    shape_x, shape_w, pad, stride = case
    r = np.random.default_rng(5)
    x, w = r.normal(size=shape_x), r.normal(size=shape_w)
    b = r.normal(size=shape_w[:-4] + shape_w[-1:])
    cuts = []
    real = L.small_product_block
    monkeypatch.setattr(L, 'small_product_block', lambda *a: cuts.append(real(*a)) or cuts[-1])
    results = []
    for mnk in (0, 600, 2000):
        monkeypatch.setattr(L, '_SMALL_GEMM_MNK', mnk)
        results.append(_conv_results(x, w, b, stride, pad))
    assert any(c is not None for c in cuts)                  # some product was cut
    for cut in results[1:]:
        for a, e in zip(cut, results[0]):
            assert rel_error(a, e) < 1e-13


@pytest.mark.parametrize('C,mnk', [(16, 200_000), (3, 20_000)])   # dw from the phases; from im2col(x)
def test_every_kind_of_product_is_cut_and_equals_the_whole_one(monkeypatch, C, mnk):
    """conv2-like (C = F) and conv1-like (C < F) layers at a cut that splits every product:
    the forward's and dx's (_mm) and dw's (_mm_tn), with remainders or without."""
    r = np.random.default_rng(C)
    x, w = r.normal(size=(2, 4, 16, 16, C)), r.normal(size=(2, 5, 5, C, 16))
    b = r.normal(size=(2, 16))
    cut = {}
    for name in ('_mm', '_mm_tn'):
        real = getattr(L, name)

        def spy(xp, a, bb, name=name, real=real, **kw):
            K, N = (a.shape[-1], bb.shape[-1]) if name == '_mm' else (bb.shape[-1], a.shape[-1])
            cut.setdefault(name, []).append(L.small_product_block(xp, a.shape[1], K, N) is not None)
            return real(xp, a, bb, **kw)
        monkeypatch.setattr(L, name, spy)
    monkeypatch.setattr(L, '_SMALL_GEMM_MNK', 0)
    whole = _conv_results(x, w, b, 2, 'SAME')
    cut.clear()
    monkeypatch.setattr(L, '_SMALL_GEMM_MNK', mnk)
    blocks = _conv_results(x, w, b, 2, 'SAME')
    assert all(cut['_mm']) and all(cut['_mm_tn'])
    assert len(cut['_mm']) > 4 and cut['_mm_tn']              # the forward's, dx's per phase, dw's
    for a, e in zip(blocks, whole):
        assert (a is None and e is None) or rel_error(a, e) < 1e-13


# --------------------------------------------------------------------------- PyTorch oracle

def _torch_or_skip():
    return pytest.importorskip('torch')


@pytest.mark.parametrize('cfg_kw,tasks', [
    (dict(n_tasks=5), (1, 4)),                                            # the original, mixed step
    (dict(image_shape=(9, 7, 3), conv_filters=(3, 4), kernel=3, stride=2, fc=(5, 4), z_dim=6, n_tasks=4,
          gen_hidden=(7,), fc_activation=True), (2,)),                    # odd sizes, hidden layer
    (dict(image_shape=(8, 8, 2), conv_filters=(3,), kernel=5, stride=1, fc=(5,), z_dim=6, n_tasks=4,
          gen_output='linear'), (0, 3)),                                  # stride 1, linear output
])
def test_torch_oracle_agrees_in_float64(cfg_kw, tasks):
    _torch_or_skip()
    errs = bench.torch_agreement(S.Config(**cfg_kw), tasks=tasks, m=3, seed=2)
    assert max(errs.values()) < 1e-6, errs
    assert set(errs) == {'loss'} | set(S.init_params(S.Config(**cfg_kw)))


def test_torch_oracle_catches_a_wrong_gradient():
    _torch_or_skip()
    cfg = S.Config(n_tasks=5)

    def corrupt(grads):          # a wrong conv backward would show up like this in dtheta
        grads['gen.out.w'][:, :75] *= 1.01
    errs = bench.torch_agreement(cfg, tasks=(1,), m=2, corrupt=corrupt)
    assert errs['gen.out.w'] > 1e-4 and errs['loss'] < 1e-12


def test_torch_oracle_agrees_on_the_blocked_path(monkeypatch):
    _torch_or_skip()
    monkeypatch.setattr(L, '_BLOCK_BYTES', 1)
    errs = bench.torch_agreement(S.Config(n_tasks=5), tasks=(0, 2), m=3, seed=4)
    assert max(errs.values()) < 1e-6, errs


def test_vs_torch_quick_run(tmp_path, capsys):
    _torch_or_skip()
    res = bench.main(['--quick', '--vs-torch', '--batches', '4', '--mixed', '2', '2',
                      '--json', str(tmp_path / 'b.json')])
    out = capsys.readouterr().out
    assert 'torch/ours' in out and 'torch oracle' in out and 'torch conv2 backward' in out
    for s in res['steps']:
        assert s['torch_ms'] > 0 and s['speed_vs_torch'] == pytest.approx(s['torch_ms'] / s['ms'])
        parts = res['torch_breakdown'][s['name']]
        assert len(parts) == 8 and all(v == v for v in parts.values())          # 4 convs x fwd/bwd, no NaN
    assert res['torch_check']['max_rel_error'] < 1e-6
    assert json.loads((tmp_path / 'b.json').read_text())['torch_check']['dtype'] == 'float64'


def test_cpu_and_gpu_names(monkeypatch):
    name = bench.cpu_name()
    assert isinstance(name, str) and name
    if os.path.exists('/proc/cpuinfo'):
        assert '(family ' in name or 'model name' not in open('/proc/cpuinfo').read()
    assert bench.gpu_name(np) is None

    class Runtime:                                        # CuPy's cuda.runtime, as far as bench uses it
        @staticmethod
        def getDeviceProperties(i):
            assert i == 0
            return {'name': b'NVIDIA H100 80GB HBM3'}

    class Cuda:
        runtime = Runtime

        class Device:
            id = 0

    class FakeCupy:
        cuda = Cuda
    assert bench.gpu_name(FakeCupy) == 'NVIDIA H100 80GB HBM3'
