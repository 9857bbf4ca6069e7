"""End to end: both run scripts on a tiny synthetic set, in seconds. Outputs exist and are
well-formed, z-only leaves the generator unchanged, Ctrl-C + --resume gives the same
final numbers as a straight run, NaN stops cleanly."""
import csv
import json
import os
import signal
import time

import numpy as np
import pytest

import run_exp1
import run_exp2
import supernet as S
import train as T

TINY = ['--data', 'cifar100', '--z-dim', '100', '--batch', '4', '--lr', '1e-3', '--quiet']


def _exp1_args(data_dir, out, *extra):
    return TINY + ['--data-dir', str(data_dir), '--out', str(out), '--steps', '30', '--adapt-steps', '8',
                   '--holdout', '97-98', '--eval-tasks', '3', '--log-every', '5', '--ckpt-every', '10', *extra]


@pytest.fixture(scope='module')
def straight_exp1(tiny_cifar_dir, tmp_path_factory):
    """One uninterrupted tiny Experiment 1 run, shared by the tests below."""
    out = tmp_path_factory.mktemp('exp1') / 'straight'
    assert run_exp1.main(_exp1_args(tiny_cifar_dir, out)) == 0
    return out


def _strip_times(obj):
    """Drop wall-clock fields (they differ between any two runs)."""
    if isinstance(obj, dict):
        return {k: _strip_times(v) for k, v in obj.items()
                if k not in ('wall_s', 'elapsed_s', 'images_per_s', 'config', 'plots', 'peak_rss_mb')}
    if isinstance(obj, list):
        return [_strip_times(v) for v in obj]
    return obj


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_exp1_end_to_end(tiny_cifar_dir, straight_exp1):
    out = straight_exp1
    s = json.loads((out / 'summary.json').read_text())
    assert 'CPU threads' in (out / 'log.txt').read_text()
    assert s['param_counts']['classifier'] == 37165
    assert s['param_counts']['generator'] == 37165 * 101
    for h in ('97', '98'):
        a = s['adapt'][h]
        assert set(a) == {'control_z0', 'control_zmean', 'control_zother', 'control_znew', 'z_only',
                          'whole_network', 'finetune'}
        assert a['control_zother']['test_acc'] <= a['control_zother']['test_acc_best'] <= 1.0
        assert a['z_only']['generator_unchanged'] is True and a['z_only']['z_change'] > 1e-3
        assert a['z_only']['trainable'] == 100
        assert a['whole_network']['trainable'] == 37165
        assert a['finetune']['trainable'] == 37165 * 101 + 100
        for m in a.values():
            assert 0.0 <= m['test_acc'] <= 1.0 and np.isfinite(m['test_loss'])
    assert len(s['phase1']['per_task']) == 97          # every training task evaluated
    md = (out / 'results.md').read_text()
    assert 'synthetic data' in md and 'z only, generator frozen' in md and '| T97 | T98 |' in md
    rows = _read_csv(out / 'adapt_curves.csv')
    assert {r['method'] for r in rows} == {'z_only', 'whole_network', 'finetune'}
    assert _read_csv(out / 'phase1_curve.csv')[-1]['step'] == '30'
    assert not (out / 'ckpt').exists() or not list((out / 'ckpt').iterdir())   # stage checkpoints cleaned up
    # the phase-1 generator is saved, with the model's shapes
    p1, _, _ = S.load_checkpoint(out / 'phase1.npz')
    assert p1['gen.out.w'].shape == (100, 37165) and p1['z'].shape == (97, 100)
    # an existing run is never overwritten silently
    with pytest.raises(SystemExit, match='--resume'):
        run_exp1.main(_exp1_args(tiny_cifar_dir, out))



def test_fingerprints_name_the_data_and_initial_parameters(tiny_cifar_dir, straight_exp1):
    """summary.json's fingerprints are md5s of the run's data and initial parameters: they
    match an independent hash of the loaded files and of init_params, and change when one
    pixel or the seed does (what tells two hosts' runs apart before step 1)."""
    import hashlib

    import data
    fp = json.loads((straight_exp1 / 'summary.json').read_text())['fingerprints']
    assert 'fingerprints (md5): train_data ' + fp['train_data'] in (straight_exp1 / 'log.txt').read_text()
    ds = data.load_cifar100(tiny_cifar_dir)
    h = hashlib.md5(ds.train_x.tobytes() + ds.train_y.tobytes())
    assert fp['train_data'] == h.hexdigest()
    cfg = S.Config(n_tasks=97)
    p = S.init_params(cfg, seed=0)
    assert fp['init_params'] == hashlib.md5(b''.join(p[k].tobytes() for k in sorted(p))).hexdigest()
    assert T.fingerprints(ds, cfg, 0) == fp
    assert T.fingerprints(ds, cfg, 1)['init_params'] != fp['init_params']
    ds.test_x = ds.test_x.copy()
    ds.test_x[3, 4, 5, 1] ^= 1
    changed = T.fingerprints(ds, cfg, 0)
    assert changed['test_data'] != fp['test_data'] and changed['train_data'] == fp['train_data']

def _interrupt_at(monkeypatch, stage_prefix, n_calls):
    """Make the sampler of the first stage named stage_prefix* raise a real SIGINT at its n-th batch."""
    orig = T.train_stage

    def wrapped(run, name, params, cfg, step_fn, sample_fn, *a, **k):
        if name.startswith(stage_prefix) and not wrapped.fired:
            count = [0]

            def sample(rng):
                count[0] += 1
                if count[0] == n_calls:
                    wrapped.fired = True
                    os.kill(os.getpid(), signal.SIGINT)      # the user's Ctrl-C
                return sample_fn(rng)
            return orig(run, name, params, cfg, step_fn, sample, *a, **k)
        return orig(run, name, params, cfg, step_fn, sample_fn, *a, **k)
    wrapped.fired = False
    monkeypatch.setattr(T, 'train_stage', wrapped)


@pytest.mark.parametrize('stage,at', [('phase1', 13), ('adapt/T97/z_only', 5), ('adapt/T98/finetune', 3)])
def test_exp1_ctrl_c_then_resume_equals_straight_run(tiny_cifar_dir, straight_exp1, tmp_path, monkeypatch,
                                                     stage, at):
    straight = straight_exp1
    cut = tmp_path / 'cut'
    _interrupt_at(monkeypatch, stage, at)
    assert run_exp1.main(_exp1_args(tiny_cifar_dir, cut)) == 130      # stopped, checkpoint saved
    assert list((cut / 'ckpt').iterdir())
    assert not (cut / 'summary.json').exists()
    wall_cut = json.loads((cut / 'state.json').read_text())['wall_s']
    t0 = time.perf_counter()
    assert run_exp1.main(_exp1_args(tiny_cifar_dir, cut, '--resume')) == 0
    resumed = time.perf_counter() - t0
    # both commands counted: the cut one's time on top of (about) the resumed one's
    assert json.loads((cut / 'summary.json').read_text())['wall_s'] > resumed + wall_cut / 2 > 0
    a = _strip_times(json.loads((straight / 'summary.json').read_text()))
    b = _strip_times(json.loads((cut / 'summary.json').read_text()))
    assert a == b
    for f in ('phase1_curve.csv', 'adapt_curves.csv'):      # every row of the curves too
        assert _strip_times(_read_csv(straight / f)) == _strip_times(_read_csv(cut / f)), f


def test_phase1_from_reuses_only_a_matching_phase1(tiny_cifar_dir, straight_exp1, tmp_path, capsys):
    """Another run's phase 1 is taken when only phase-2 options differ (its generator and
    figures, bit for bit); another seed, phase-1 learning rate or other tasks are refused."""
    out = tmp_path / 'reuse'
    assert run_exp1.main(_exp1_args(tiny_cifar_dir, out, '--methods', 'z_only', '--z-lr', '3e-2',
                                    '--phase1-from', str(straight_exp1))) == 0
    assert 'reusing the finished phase 1' in (out / 'log.txt').read_text()
    ours, theirs = S.load_checkpoint(out / 'phase1.npz')[0], S.load_checkpoint(straight_exp1 / 'phase1.npz')[0]
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)
    s, t = (json.loads((d / 'summary.json').read_text())['phase1'] for d in (out, straight_exp1))
    assert _strip_times(s) == _strip_times(t)
    bad = tmp_path / 'bad'
    for extra, msg in ((['--seed', '1'], "--seed 0 there, 1 here"),
                       (['--lr', '1e-2'], "--lr 0.001 there, 0.01 here"),
                       (['--holdout', '96-98'], 'trained on other tasks')):
        with pytest.raises(SystemExit, match=msg):
            run_exp1.main(_exp1_args(tiny_cifar_dir, bad, *extra, '--phase1-from', str(straight_exp1)))
        assert not (bad / 'state.json').exists()       # refused before anything was stored: --out reusable


def _tiny_stage(tmp_path, spoil):
    """A tiny one-task model, its RunDir, a step_fn that hands (step number, loss, grads)
    to spoil, which returns the loss to report (and may change grads), and a fixed batch."""
    cfg = S.Config(image_shape=(8, 8, 3), conv_filters=(2,), kernel=3, fc=(3,), z_dim=4, n_tasks=1)
    params = S.init_params(cfg, seed=0)
    run = T.RunDir(str(tmp_path / 'r'), quiet=True)
    calls = [0]

    def step_fn(p, batch):
        calls[0] += 1
        x, y = batch
        loss, g, logits = S.loss_and_grads(p, x, y, [0], cfg)
        return spoil(calls[0], loss, g), g, logits, y

    r = np.random.default_rng(0)
    x = r.normal(size=(1, 4, 8, 8, 3)).astype(np.float32)
    y = np.array([[0, 1, 0, 1]], dtype=np.float32)
    return run, params, cfg, step_fn, lambda rng: (x, y)


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tmp_path, capsys):
    run, params, cfg, step_fn, sample = _tiny_stage(tmp_path, lambda n, loss, g: loss * np.nan if n > 25 else loss)
    opt = T.Optimizer('adam', learning_rate=1e-3)
    with pytest.raises(T.TrainingDiverged, match='loss became nan between steps 20 and 30'):
        T.train_stage(run, 's', params, cfg, step_fn, sample, 50, opt, None, 0, log_every=10, ckpt_every=20)
    saved, _, meta = S.load_checkpoint(run.ckpt('s'))
    assert meta['extra']['step'] == 20
    assert all(np.all(np.isfinite(v)) for v in saved.values())


def test_parameters_gone_non_finite_are_never_checkpointed(tmp_path):
    """The loss of a step is that of the parameters before its update: an update to inf
    after a finite loss must not be saved as 'the last good checkpoint'."""
    def spoil(n, loss, g):
        if n == 20:
            g['z'] = g['z'] * np.inf          # step 20's loss is finite; its update is not
        return loss
    run, params, cfg, step_fn, sample = _tiny_stage(tmp_path, spoil)
    with np.errstate(invalid='ignore', over='ignore'):
        with pytest.raises(T.TrainingDiverged, match='z became non-finite by step 20: stopping without saving'):
            T.train_stage(run, 's', params, cfg, step_fn, sample, 50,
                          T.Optimizer('sgd', learning_rate=1e-3), None, 0, log_every=10, ckpt_every=10)
    _, _, meta = S.load_checkpoint(run.ckpt('s'))        # refuses NaN/inf: so this is finite
    assert meta['extra']['step'] == 10


def test_exp2_end_to_end(tiny_cifar_dir, tmp_path):
    out = tmp_path / 'e2'
    args = TINY + ['--data-dir', str(tiny_cifar_dir), '--out', str(out), '--steps', '30',
                   '--adapt-steps', '8', '--holdout-pair', '3', '--eval-tasks', '3', '--ckpt-every', '10',
                   '--methods', 'z_only,whole_network,ke', '--ke-generations', '2']
    assert run_exp2.main(args) == 0
    s = json.loads((out / 'summary.json').read_text())
    assert set(s['adapt']) == {'3', '53'}
    assert s['adapt']['3']['z_only']['generator_unchanged'] is True and s['adapt']['3']['z_only']['z_change'] > 1e-3
    assert len(s['phase1']['per_task']) == 98
    assert len(s['z_swap']) == 98
    # z = 0 is one classifier for both twins: on identical images with reversed labels
    # the twins' accuracies add up to exactly 1
    sw = {int(k): v for k, v in s['z_swap'].items()}
    for t in range(49):
        if t == 3:
            continue
        assert abs(sw[t]['z0_acc'] + sw[t + 50]['z0_acc'] - 1.0) < 1e-9
    assert abs(s['table']['all']['z0_acc'] - 0.5) < 1e-9
    rows = _read_csv(out / 'per_task.csv')
    assert rows[0]['class0'] == '0' and rows[0]['class1'] == '50'
    assert {r['task'] for r in rows} == {str(t) for t in range(100) if t not in (3, 53)}
    md = (out / 'results.md').read_text()
    assert 'twin\'s z' in md
    ke = s['adapt']['53']['ke']                # Knowledge Evolution: in results.md too, not only summary.json
    assert "| Knowledge Evolution (kels, 2 generations), dense | 37,165 | " in md
    assert f"{ke['test_acc']:.3f} ({ke['test_loss']:.3f}) |" in md
    assert f"| Knowledge Evolution (kels), slim (fit hypothesis only) | {ke['slim_params']:,} | " in md


@pytest.mark.parametrize('mod', [run_exp1, run_exp2])
def test_cli_help(mod, capsys):
    with pytest.raises(SystemExit) as e:
        mod.main(['--help'])
    assert e.value.code == 0
    h = capsys.readouterr().out
    for flag in ('--data', '--data-dir', '--steps', '--batch', '--lr', '--optimizer', '--z-dim', '--seed',
                 '--device', '--out', '--quick', '--resume'):
        assert flag in h


def test_gpu_request_without_cupy_is_a_clear_error(tiny_cifar_dir, tmp_path, capsys):
    try:
        import cupy  # noqa: F401
        pytest.skip('cupy installed')
    except ImportError:
        pass
    rc = run_exp1.main(_exp1_args(tiny_cifar_dir, tmp_path / 'g', '--device', 'gpu'))
    assert rc == 1
    assert 'needs CuPy' in capsys.readouterr().err


def test_exp1_with_hypernetwork_and_knowledge_evolution(tiny_cifar_dir, tmp_path):
    out = tmp_path / 'hyper'
    args = _exp1_args(tiny_cifar_dir, out, '--generator', 'hyper', '--gen-output', 'linear',
                      '--methods', 'z_only,ke', '--ke-generations', '2')
    assert run_exp1.main(args) == 0
    s = json.loads((out / 'summary.json').read_text())
    assert s['param_counts']['generator'] < S.count_params(S.Config())['generator'] / 10
    a = s['adapt']['98']
    assert a['z_only']['generator_unchanged'] is True and a['z_only']['trainable'] == 100
    assert a['z_only']['z_change'] > 1e-3
    assert [g['gen'] for g in a['ke']['generations']] == [1, 2]
    assert 0 < a['ke']['slim_params'] < 37165
    md = (out / 'results.md').read_text()
    assert "Ha et al.'s hypernetwork frozen" in md and 'Knowledge Evolution (kels' in md and 'slim' in md


def test_plots_are_optional(tmp_path, monkeypatch):
    import sys
    curves = {'a': [{'step': 0, 'test_acc': 0.5}, {'step': 10, 'test_acc': 0.8}]}
    monkeypatch.setitem(sys.modules, 'matplotlib', None)          # as if not installed
    assert T.plot_curves(str(tmp_path / 'no.png'), 't', curves) is False
    assert not (tmp_path / 'no.png').exists()
    assert T.pyplot() is None                 # what the run scripts' "plots skipped" line checks
    monkeypatch.undo()
    pytest.importorskip('matplotlib')
    assert T.pyplot() is not None
    assert T.plot_curves(str(tmp_path / 'yes.png'), 't', curves) is True
    # nothing to plot (no curve, or no row with the key): no empty figure, no legend warning
    assert T.plot_curves(str(tmp_path / 'empty.png'), 't', {}) is False
    assert T.plot_curves(str(tmp_path / 'empty.png'), 't', {'a': [{'step': 0, 'test_acc': None}]}) is False
    assert not (tmp_path / 'empty.png').exists()
    from PIL import Image
    with Image.open(tmp_path / 'yes.png') as im:
        assert im.size[0] > 100 and im.size[1] > 100


@pytest.mark.parametrize('extra,msg', [
    (['--methods', 'z_onyl'], 'unknown --methods'),
    (['--tasks-per-step', '200'], 'exceeds the 97 training tasks'),
    (['--batch', '0'], '--batch must be >= 1'),
    (['--z-dim', '50'], 'one-hot z needs --z-dim'),
    (['--holdout', '90-98', '--z-dim', '95'], 'unused one-hot index'),
    (['--generator', 'hyper', '--gen-hidden', '8'], '--gen-hidden applies'),
    (['--generator', 'hyper', '--gen-init', 'original'], '--gen-init applies'),
    (['--threads', '-1'], '--threads must be >= 0'),
    (['--threads', '100000'], r'--threads 100000: this machine has \d+ usable CPU'),
    (['--log-every', '-1'], '--log-every must be >= 0'),
    (['--eval-every', '-1'], '--eval-every must be >= 0'),
    (['--ckpt-every', '-5'], '--ckpt-every must be >= 0'),
    (['--eval-tasks', '0'], '--eval-tasks must be >= 1'),
    (['--eval-tasks', '-3'], '--eval-tasks must be >= 1'),
    (['--gen-hidden', '0'], '--gen-hidden must be comma-separated widths >= 1'),
    (['--gen-hidden=-4'], '--gen-hidden must be'),
    (['--gen-hidden', '8,abc'], '--gen-hidden must be'),
    (['--seed', '-1'], '--seed must be >= 0'),
    (['--lr', '-1'], '--lr must be a positive number'),
    (['--z-lr', '0'], '--z-lr must be a positive number'),
    (['--baseline-lr', 'nan'], '--baseline-lr must be a positive number'),
    (['--finetune-lr=-1e-3'], '--finetune-lr must be a positive number'),
    (['--holdout', '99'], '--holdout: task 99'),
])
def test_bad_options_fail_before_any_training(tiny_cifar_dir, tmp_path, monkeypatch, extra, msg):
    import data
    monkeypatch.setattr(data, 'load_dataset', _no_data)
    with pytest.raises(SystemExit, match=msg):
        run_exp1.main(_exp1_args(tiny_cifar_dir, tmp_path / 'bad', *extra))
    assert not (tmp_path / 'bad').exists()


def _no_data(*a, **k):
    raise AssertionError('data read before the options were checked')


@pytest.mark.parametrize('mod', [run_exp1, run_exp2])
@pytest.mark.parametrize('where', ['a file', 'under a file', '/proc'])
def test_bad_out_is_one_error_line_before_any_data(tmp_path, monkeypatch, mod, where):
    import data
    monkeypatch.setattr(data, 'load_dataset', _no_data)
    if where == '/proc' and not os.path.isdir('/proc/self'):
        pytest.skip('no /proc')
    (tmp_path / 'f').write_text('x')
    out = {'a file': tmp_path / 'f', 'under a file': tmp_path / 'f' / 'run', '/proc': '/proc/supernet-run'}[where]
    with pytest.raises(SystemExit, match=f"^error: --out {out}"):
        mod.main(['--quick', '--quiet', '--out', str(out)])
    assert (tmp_path / 'f').read_text() == 'x'


def _mode(path):
    return os.stat(path).st_mode & 0o777


def test_interrupted_run_resumes_only_with_its_own_settings(tiny_cifar_dir, straight_exp1, tmp_path, monkeypatch):
    out = tmp_path / 'r'
    _interrupt_at(monkeypatch, 'phase1', 12)
    assert run_exp1.main(_exp1_args(tiny_cifar_dir, out)) == 130
    ckpt = out / 'ckpt' / 'phase1.npz'
    saved = ckpt.read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert _mode(ckpt) == _mode(out / 'state.json') == 0o666 & ~umask      # not mkstemp's 0600
    with pytest.raises(SystemExit, match='already holds a run'):        # no silent resume
        run_exp1.main(_exp1_args(tiny_cifar_dir, out, '--seed', '3'))
    other_data = tmp_path / 'data2'
    os.symlink(tiny_cifar_dir, other_data)
    for extra, diffs in [
        (['--holdout', '98'], ["--holdout '97-98' (now '98')"]),        # would train T97, then "hold it out"
        (['--seed', '3', '--batch', '5', '--tasks-per-step', '2', '--steps', '40'],
         ['--seed 0 (now 3)', '--batch 4 (now 5)', '--tasks-per-step 1 (now 2)', '--steps 30 (now 40)']),
        (['--adapt-steps', '9', '--z-lr', '0.1', '--optimizer', 'adam'],
         ['--adapt-steps 8 (now 9)', '--z-lr 0.01 (now 0.1)', "--optimizer 'rmsprop' (now 'adam')"]),
        (['--data-dir', str(other_data), '--log-every', '3'], ['--data-dir ', '--log-every 5 (now 3)']),
        (['--data', 'synthetic', '--synthetic-train', '5'],
         ["--data 'cifar100' (now 'synthetic')", '--data-dir ', '--synthetic-train None (now 5)',
          '--synthetic-test None (now 100)']),
    ]:
        with pytest.raises(SystemExit) as e:
            run_exp1.main(_exp1_args(tiny_cifar_dir, out, '--resume', *extra))
        msg = str(e.value.code)
        assert msg.startswith('error: --resume:') and '\n' not in msg
        for d in diffs:
            assert d in msg
        assert msg.count(' (now ') == len(diffs)
        assert ckpt.read_bytes() == saved                              # nothing lost
    with pytest.raises(SystemExit, match="--holdout '97-98' \\(now unset\\)"):  # the other experiment's script
        run_exp2.main(TINY + ['--data-dir', str(tiny_cifar_dir), '--out', str(out), '--resume'])
    # no stored settings (a run from before they were stored, or state.json deleted as the
    # corrupt-file advice says): the checkpoint's own checks remain, a refused resume stores
    # nothing, and an accepted one stores its settings again
    os.remove(out / 'state.json')
    assert run_exp1.main(_exp1_args(tiny_cifar_dir, out, '--resume', '--optimizer', 'adam')) == 1
    assert ckpt.read_bytes() == saved
    assert 'settings' not in json.loads((out / 'state.json').read_text())
    # options that change no result may differ; the run ends where a straight run does
    assert run_exp1.main(_exp1_args(tiny_cifar_dir, out, '--resume', '--ckpt-every', '5')) == 0
    assert json.loads((out / 'state.json').read_text())['settings']['optimizer'] == 'rmsprop'
    with pytest.raises(SystemExit, match="--seed 0 \\(now 3\\)"):
        run_exp1.main(_exp1_args(tiny_cifar_dir, out, '--resume', '--seed', '3'))
    a = _strip_times(json.loads((straight_exp1 / 'summary.json').read_text()))
    assert _strip_times(json.loads((out / 'summary.json').read_text())) == a
    assert _mode(out / 'phase1.npz') == 0o666 & ~umask


def test_aggregate_anywhere_and_quick_keeps_given_options(straight_exp1, capsys):
    assert run_exp1.main(['--quiet', '--aggregate', str(straight_exp1), str(straight_exp1) + '/']) == 0
    cap = capsys.readouterr()
    assert 'z_only' in cap.out and 'over 1 runs' in cap.out            # a directory given twice counts once
    assert f"note: {straight_exp1}/ is given more than once" in cap.err
    args = run_exp1.parse(['--quick', '--steps=77'])
    assert args.steps == 77 and args.adapt_steps == run_exp1.QUICK['adapt_steps']


def test_aggregate_rejects_corrupt_and_foreign_summaries(straight_exp1, tmp_path):
    for name, text, msg in [('corrupt', '{"table": ', 'is corrupt'),
                            ('exp2', '{"experiment": 2, "table": {}, "config": {"seed": 0}}',
                             'is an Experiment 2 run; --aggregate takes Experiment 1 runs'),
                            ('list', '[]', 'is not a run summary')]:
        d = tmp_path / name
        d.mkdir()
        (d / 'summary.json').write_text(text)
        with pytest.raises(SystemExit, match=f"^error: {d / 'summary.json'} {msg}"):
            run_exp1.main(['--aggregate', str(straight_exp1), str(d)])


def test_aggregate_pools_only_runs_that_differ_in_their_seed(straight_exp1, tmp_path):
    """Other options, other data or a seed twice: refused by name, not averaged as seeds."""
    s = json.loads((straight_exp1 / 'summary.json').read_text())
    for name, change, msg in [('seed1', {'config': {'seed': 1}}, None),
                              ('lr', {'config': {'seed': 1, 'lr': 0.5}}, r'other options \(--lr 0.001 / 0.5\)'),
                              ('data', {'config': {'seed': 1}, 'fingerprints': {'test_data': '0' * 32}},
                               'test_data fingerprint'),
                              ('again', {}, r'seed\(s\) \[0\] given by more than one run')]:
        d = tmp_path / name
        d.mkdir()
        r = json.loads(json.dumps(s))
        for k, v in change.items():
            r[k].update(v)
        (d / 'summary.json').write_text(json.dumps(r))
        if msg is None:
            assert run_exp1.main(['--aggregate', str(straight_exp1), str(d)]) == 0
        else:
            with pytest.raises(SystemExit, match=msg):
                run_exp1.main(['--aggregate', str(straight_exp1), str(d)])


def test_damaged_phase1_and_state_files_give_workable_advice(tiny_cifar_dir, straight_exp1, tmp_path, capsys):
    import shutil
    out = tmp_path / 'copy'
    shutil.copytree(straight_exp1, out)
    resume = _exp1_args(tiny_cifar_dir, out, '--resume')
    a = _strip_times(json.loads((straight_exp1 / 'summary.json').read_text()))
    # a truncated phase1.npz: the error names it; deleting it as told redoes phase 1, to the same results
    with open(out / 'phase1.npz', 'r+b') as f:
        f.truncate(1000)
    capsys.readouterr()
    assert run_exp1.main(resume) == 1
    assert f"error: {out / 'phase1.npz'} is unreadable or corrupt" in capsys.readouterr().err
    os.remove(out / 'phase1.npz')
    assert run_exp1.main(resume) == 0
    log = (out / 'log.txt').read_text()
    assert 'phase1.npz is missing: phase 1 and every stage after it are then redone' in log
    after = log.split('phase1.npz is missing')[1]
    assert 'done already' not in after and '[adapt/T98/finetune] step' in after     # not mixed with old stages
    assert _strip_times(json.loads((out / 'summary.json').read_text())) == a
    # a corrupt state.json: named, and deleting it as told works too
    for text in ('{"stages": {', '{"stages": []}', '{"settings": "x"}', '{"stages": {"phase1": 3}}'):
        (out / 'state.json').write_text(text)       # unreadable, or valid JSON of the wrong structure
        with pytest.raises(SystemExit, match=f"^error: {out / 'state.json'} is corrupt .*delete it"):
            run_exp1.main(resume)
    os.remove(out / 'state.json')
    assert run_exp1.main(resume) == 0
    assert _strip_times(json.loads((out / 'summary.json').read_text())) == a
