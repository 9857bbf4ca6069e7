"""The whole SuperNet backward against finite differences (float64), parameter counts,
training, z-only mode, the baseline, checkpoints and seeds."""
import os

import numpy as np
import pytest

import supernet as S
from nn.gradcheck import check_gradient, rel_error
from nn.optim import Optimizer
from tests.toy import random_batch, toy_tasks

TOL = 1e-6              # the whole SuperNet (generator + classifier) checks
CLASSIFIER_TOL = 1e-8   # the classifier alone, float64 (a correct backward lands near 1e-10)

SMALL = dict(image_shape=(8, 8, 3), conv_filters=(3, 4), kernel=3, stride=2, fc=(5,), z_dim=6, n_tasks=4)


def _random_params(cfg, seed, scale=1.0):
    """Non-trivial float64 parameters: random z, random biases, scaled weights."""
    r = np.random.default_rng(seed)
    p = S.init_params(cfg, seed=seed, dtype=np.float64)
    p['z'] = r.normal(size=p['z'].shape)
    for k in S.generator_keys(p):
        p[k] = r.normal(0, 0.1, size=p[k].shape) if k.endswith('.b') else p[k] * scale
    return p


def _check_all(cfg, tasks, m=3, n_samples=None, seed=0, h=1e-5):
    errs = S.gradient_check(cfg, tasks, m=m, n_samples=n_samples, seed=seed, h=h)
    assert set(errs) == set(S.init_params(cfg, dtype=np.float64))
    return errs


def test_unused_z_rows_get_zero_gradient():
    cfg = S.Config(**SMALL)
    p = _random_params(cfg, 0, 2.0)
    x, y = random_batch(cfg, 2, 3, 1)
    _, g, _ = S.loss_and_grads(p, x, y, [1, 3], cfg)
    assert np.all(g['z'][[0, 2]] == 0) and np.all(g['z'][[1, 3]] != 0)


@pytest.mark.parametrize('gen_output', ['tanh', 'linear'])
@pytest.mark.parametrize('gen_hidden', [(), (7,), (7, 5)])
@pytest.mark.parametrize('fc_activation', [False, True])
def test_supernet_gradcheck_small(gen_output, gen_hidden, fc_activation):
    cfg = S.Config(**SMALL, gen_output=gen_output, gen_hidden=gen_hidden, fc_activation=fc_activation)
    errs = _check_all(cfg, tasks=[2], n_samples=150)
    assert max(errs.values()) < TOL, errs


def test_supernet_gradcheck_mixed_tasks():
    cfg = S.Config(**SMALL, gen_hidden=(7,))
    errs = _check_all(cfg, tasks=[3, 0, 1], n_samples=200)
    assert max(errs.values()) < TOL, errs


def test_supernet_gradcheck_original_config():
    """The original: 37,165 generated weights; a few hundred sampled coordinates."""
    cfg = S.Config(n_tasks=5)
    for tasks in ([1], [1, 4]):      # h = 1e-6: a 1e-5 step can cross a leaky-ReLU kink here
        errs = _check_all(cfg, tasks=tasks, m=2, n_samples=120, h=1e-6)
        assert max(errs.values()) < TOL, errs


def test_gradient_check_samples_every_generated_tensor():
    """The generator's output layer is sampled per classifier tensor: in the original
    configuration every tensor's columns (out.b is one column of 37,165) are checked, in
    W and in b; z only in the batch's rows (and a few unused ones)."""
    cfg = S.Config(n_tasks=5)
    p = S.init_params(cfg, dtype=np.float64)
    layout, P = S.classifier_layout(cfg)
    groups = S._gradcheck_groups(cfg, p, [1, 3], 200, np.random.default_rng(0))
    assert set(groups) == set(p)
    for k in ('gen.out.w', 'gen.out.b'):
        assert [name for name, _ in groups[k]] == list(layout)
        for name, idx in groups[k]:
            off, n, _ = layout[name]
            cols = idx % P
            assert len(idx) == min(15, n * (100 if k == 'gen.out.w' else 1)), (k, name)
            assert len(set(idx.tolist())) == len(idx) and np.all((off <= cols) & (cols < off + n)), (k, name)
    (_, used), (_, unused) = groups['z']
    assert len(used) == 200 and set((used // cfg.z_dim).tolist()) == {1, 3}
    assert len(unused) == 20 and not set((unused // cfg.z_dim).tolist()) & {1, 3}
    small = S.Config(**SMALL)                          # every task in the batch: no unused z rows
    assert [label for label, _ in S._gradcheck_groups(small, S.init_params(small, dtype=np.float64),
                                                      [0, 1, 2, 3], 40, np.random.default_rng(0))['z']] == ['used rows']
    assert max(S.gradient_check(small, [3, 1, 0, 2], m=1, n_samples=40).values()) < TOL


def test_gradient_check_refuses_a_parameter_whose_gradient_vanishes(monkeypatch):
    """A generator that ignores its output bias (and returns a zero gradient for it)
    would pass a value check of gen.out.b (0 = 0): gradient_check must raise instead."""
    out_fwd, gen_bwd = S._out_layer_forward, S.generator_backward
    monkeypatch.setattr(S, '_out_layer_forward', lambda h, W, b: out_fwd(h, W, 0 * b))

    def backward(*args, **kw):
        dZ, grads = gen_bwd(*args, **kw)
        grads['gen.out.b'] = 0 * grads['gen.out.b']
        return dZ, grads
    monkeypatch.setattr(S, 'generator_backward', backward)
    with pytest.raises(RuntimeError, match=r'gen\.out\.b \(conv1\.w\).*prove nothing'):
        S.gradient_check(S.Config(**SMALL), [2], n_samples=20)


@pytest.mark.parametrize('cfg_kw,G,m,n_threads', [
    (dict(SMALL, fc_activation=True), 2, 3, 1),
    (dict(SMALL, fc_activation=True), 2, 3, 2),      # group shards: dx joined along G
    (dict(SMALL, fc_activation=True), 1, 4, 2),      # image shards: dx joined along m
    (dict(n_tasks=2), 1, 2, 1),                      # the original: 32x32, 5x5 stride 2 SAME
])
def test_classifier_input_gradient(monkeypatch, cfg_kw, G, m, n_threads):
    """classifier_backward(need_dx=True)['x'] against finite differences of
    sum(logits * dlogits), random images and a random dlogits (float64). A 1e-5 step can
    move a pre-activation across a leaky-ReLU kink (in the original geometry seed 9 does,
    for 2 of the 150 coordinates: errors ~1e-2); seed 10 crosses none, and a correct
    backward then lands near 1e-10 (1e-9 for the original)."""
    from nn.backend import set_num_threads
    monkeypatch.setattr(S, '_MIN_SHARD', {'processes': 1, 'threads': 1})
    set_num_threads(n_threads)                        # put back by conftest
    cfg = S.Config(**cfg_kw)
    r = np.random.default_rng(10)
    w = {k: v[None].repeat(G, axis=0) + r.normal(0, 0.1, size=(G,) + v.shape)
         for k, v in S.init_classifier(cfg, r, np.float64).items()}
    x = r.normal(size=(G, m) + cfg.image_shape)
    dlogits = r.normal(size=(G, m))
    logits, cache = S.classifier_forward(x, w, cfg)
    g = S.classifier_backward(dlogits, cache, need_dx=True)
    assert g['x'].shape == x.shape and set(g) == set(w) | {'x'}
    f = lambda: S.classifier_forward(x, w, cfg)[0]
    assert check_gradient(f, x, g['x'], dlogits, n_samples=150, seed=1, min_grad=1e-6) < CLASSIFIER_TOL


@pytest.mark.parametrize('generator', ['dense', 'hyper'])
def test_mixed_step_equals_sum_of_single_task_steps(generator):
    cfg = S.Config(**SMALL, generator=generator, hyper_nz=8, hyper_d=8)
    p = _random_params(cfg, 3)
    x, y = random_batch(cfg, 3, 4, 4)
    loss, g, logits = S.loss_and_grads(p, x, y, [0, 2, 3], cfg)
    acc = {k: np.zeros_like(v) for k, v in p.items()}
    total = 0.0
    for i, t in enumerate([0, 2, 3]):
        l1, g1, lg1 = S.loss_and_grads(p, x[i:i + 1], y[i:i + 1], [t], cfg)
        assert rel_error(lg1[0], logits[i]) < 1e-13
        total += float(l1) / 3
        for k in acc:
            acc[k] += g1[k] / 3
    assert abs(total - float(loss)) < 1e-13
    for k in acc:
        assert rel_error(acc[k], g[k]) < 1e-12, k


def test_group_batch_sorts_and_checks():
    cfg = S.Config(**SMALL)
    r = np.random.default_rng(5)
    x = r.normal(size=(6,) + cfg.image_shape)
    y = np.arange(6, dtype=np.float64)
    task = np.array([2, 0, 2, 1, 0, 1])
    xg, yg, tasks = S.group_batch(x, y, task)
    assert tasks.tolist() == [0, 1, 2] and xg.shape == (3, 2) + cfg.image_shape
    assert yg.tolist() == [[1, 4], [3, 5], [0, 2]]
    assert np.array_equal(xg[2, 1], x[2])
    with pytest.raises(ValueError, match='equal samples per task'):
        S.group_batch(x, y, np.array([0, 0, 0, 1, 1, 2]))


def test_parameter_counts_of_the_original():
    cfg = S.Config()
    c = S.count_params(cfg)
    assert c['classifier'] == 37165
    assert c['generator'] == 37165 * 101 == 3753665
    assert c['z_per_task'] == 100
    p = S.init_params(S.Config(n_tasks=3), seed=0)
    assert sum(v.size for k, v in p.items() if k != 'z') == c['generator']
    assert sum(int(np.prod(s)) for _, s in S.classifier_shapes(cfg)) == 37165
    h = S.count_params(S.Config(gen_hidden=(64,)))
    assert h['generator'] == 100 * 64 + 64 + 64 * 37165 + 37165


def test_generated_weights_have_the_glorot_scale_and_original_init():
    cfg = S.Config(n_tasks=3)
    p = S.init_params(cfg, seed=0)
    w = S.split_theta(S.generator_forward(p['z'], p, cfg)[0], cfg)
    # one-hot z: conv2.w ~ U(+-sqrt(6/(400+400))) through tanh (nearly linear there)
    lim = np.sqrt(6 / 800)
    assert abs(float(np.abs(w['conv2.w']).max()) - lim) < 1e-3       # 2.2e-4 off (tanh shrinks the edge)
    assert abs(float(w['conv2.w'].std()) - lim / np.sqrt(3)) < 1e-3  # 1e-4 off (19,200 draws)
    orig = S.init_generator(S.Config(gen_init='original'), np.random.default_rng(0))
    layout, _ = S.classifier_layout(cfg)
    off, n, _ = layout['conv1.w']
    assert abs(np.abs(orig['gen.out.w'][:, off:off + n]).max() - np.sqrt(6 / 1300)) < 1e-3   # 0.068
    off, n, _ = layout['fc2.w']
    assert abs(np.abs(orig['gen.out.w'][:, off:off + n]).max() - np.sqrt(6 / 10100)) < 1e-3  # 0.024
    assert np.all(orig['gen.out.b'] == 0)


def test_baseline_gradcheck():
    cfg = S.Config(**SMALL)
    r = np.random.default_rng(6)
    w = S.init_classifier(cfg, r, dtype=np.float64)
    w = {k: v + r.normal(0, 0.1, size=v.shape) for k, v in w.items()}
    x = r.normal(size=(5,) + cfg.image_shape)
    y = (r.random(5) > 0.5).astype(np.float64)
    loss, g, _ = S.baseline_loss_and_grads(w, x, y, cfg)
    f = lambda: S.baseline_loss_and_grads(w, x, y, cfg)[0]
    for k in w:
        assert check_gradient(f, w[k], g[k]) < CLASSIFIER_TOL, k


def _train(p, cfg, x, y, tasks, steps, keys=None, lr=3e-3, need_gen=True):
    opt = Optimizer('adam', learning_rate=lr)
    losses = []
    for _ in range(steps):
        loss, g, _ = S.loss_and_grads(p, x, y, tasks, cfg, need_gen_grads=need_gen)
        opt.step(p, g, keys=keys)
        losses.append(float(loss))
    return losses


def test_supernet_learns_tiny_tasks_and_z_only_adapts_with_frozen_generator():
    cfg = S.Config(**dict(SMALL, conv_filters=(8, 8), fc=(16,), n_tasks=4), gen_hidden=())
    p = S.init_params(cfg, seed=0)
    x, y = toy_tasks(cfg, 4, 32, seed=1)
    losses = _train(p, cfg, x[:3], y[:3], [0, 1, 2], steps=300)
    _, _, logits = S.loss_and_grads(p, x[:3], y[:3], [0, 1, 2], cfg)
    acc = float(((logits > 0) == (y[:3] > 0.5)).mean())
    assert acc > 0.9, (acc, losses[-1])
    # z-only on the held-out task 3: only 'z' may change, the generator bit for bit the same
    frozen = {k: v.copy() for k, v in p.items() if k != 'z'}
    z_before = p['z'].copy()
    l0 = float(S.loss_and_grads(p, x[3:], y[3:], [3], cfg)[0])
    zl = _train(p, cfg, x[3:], y[3:], [3], steps=150, keys=['z'], lr=3e-2, need_gen=False)
    assert zl[-1] < 0.5 * l0, (l0, zl[-1])
    for k, v in frozen.items():
        assert np.array_equal(p[k], v), f'{k} changed during z-only training'
    assert not np.array_equal(p['z'][3], z_before[3])
    assert np.array_equal(p['z'][:3], z_before[:3])


def test_z_only_gradients_match_full_gradients():
    cfg = S.Config(**SMALL, gen_hidden=(7,))
    p = _random_params(cfg, 7)
    x, y = random_batch(cfg, 2, 3, 8)
    _, g_full, _ = S.loss_and_grads(p, x, y, [0, 1], cfg)
    _, g_z, _ = S.loss_and_grads(p, x, y, [0, 1], cfg, need_gen_grads=False)
    assert set(g_z) == {'z'}
    assert np.array_equal(g_full['z'], g_z['z'])


def test_seed_gives_bit_identical_runs():
    cfg = S.Config(**SMALL)
    x, y = toy_tasks(cfg, 2, 8, seed=2)
    runs = []
    for _ in range(2):
        p = S.init_params(cfg, seed=11)
        _train(p, cfg, x, y, [0, 1], steps=5)
        runs.append(p)
    for k in runs[0]:
        assert np.array_equal(runs[0][k], runs[1][k])
    p3 = S.init_params(cfg, seed=12)
    assert not np.array_equal(p3['gen.out.w'], runs[0]['gen.out.w'])


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    cfg = S.Config(**SMALL)
    p = S.init_params(cfg, seed=0)
    x, y = toy_tasks(cfg, 2, 4, seed=3)
    opt = Optimizer('rmsprop', learning_rate=1e-3)
    _, g, _ = S.loss_and_grads(p, x, y, [0, 1], cfg)
    opt.step(p, g)
    path = tmp_path / 'ck.npz'
    S.save_checkpoint(path, p, cfg, opt, extra={'step': 1})
    assert [f.name for f in tmp_path.iterdir()] == ['ck.npz']      # no temporary left behind
    p2, st, meta = S.load_checkpoint(path, cfg=cfg, params_like=p)
    assert meta['extra']['step'] == 1 and meta['optimizer']['rule'] == 'rmsprop'
    for k in p:
        assert np.array_equal(p[k], p2[k])
    opt2 = Optimizer('rmsprop', learning_rate=1e-3)
    opt2.load_state_arrays(st)
    for k, v in opt.state_arrays().items():
        assert np.array_equal(v, opt2.state_arrays()[k])
    with pytest.raises(S.CheckpointError, match=r'z_dim: checkpoint 6 vs model 8'):
        S.load_checkpoint(path, cfg=S.Config(**dict(SMALL, z_dim=8)))
    other = S.init_params(S.Config(**dict(SMALL, fc=(9,))), seed=0)
    with pytest.raises(S.CheckpointError, match=r'gen.out.w: checkpoint shape'):
        S.load_checkpoint(path, params_like=other)
    (tmp_path / 'bad.npz').write_bytes(b'not a checkpoint')
    with pytest.raises(S.CheckpointError, match='corrupt'):
        S.load_checkpoint(tmp_path / 'bad.npz')
    with pytest.raises(S.CheckpointError, match='does not exist'):
        S.load_checkpoint(tmp_path / 'none.npz')
    # a readable .npz whose meta lacks the model config is damaged too (not a bare KeyError)
    np.savez(tmp_path / 'noconfig.npz', meta=np.frombuffer(b'{"extra": {}}', dtype=np.uint8))
    with pytest.raises(S.CheckpointError, match="corrupt .*KeyError: 'config'"):
        S.load_checkpoint(tmp_path / 'noconfig.npz')
    # the file's mode is the umask's, as open() would give (the temporary is created 0o666 & ~umask)
    umask = os.umask(0o027)
    try:
        S.save_checkpoint(tmp_path / 'mode.npz', p, cfg)
    finally:
        os.umask(umask)
    assert os.stat(tmp_path / 'mode.npz').st_mode & 0o777 == 0o640


def test_bad_inputs_are_rejected():
    cfg = S.Config(**SMALL)
    p = S.init_params(cfg, seed=0)
    x, y = toy_tasks(cfg, 2, 4, seed=3)
    with pytest.raises(ValueError, match='do not match'):
        S.loss_and_grads(p, x, y[:1], [0, 1], cfg)
    with pytest.raises(ValueError, match='distinct'):
        S.loss_and_grads(p, x, y, [1, 1], cfg)
    with pytest.raises(ValueError, match='should be'):
        S.loss_and_grads(p, x[..., :2], y, [0, 1], cfg)
    with pytest.raises(ValueError, match='one-hot z needs'):
        S.Config(z_dim=10, n_tasks=20)
    with pytest.raises(ValueError, match='gen_output'):
        S.Config(gen_output='relu')
    # task ids: integers naming rows of z (a float is not truncated, -1 is not the last row)
    with pytest.raises(ValueError, match='must be integers'):
        S.loss_and_grads(p, x, y, [0.0, 1.7], cfg)
    for tasks in ([-1, 3], [0, 4]):
        with pytest.raises(ValueError, match=r'outside the 4 rows'):
            S.loss_and_grads(p, x, y, tasks, cfg)
    # parameters of another model: named, not a bare KeyError or a loss from the wrong model
    with pytest.raises(ValueError, match=r"gen.out.w: shape \(6, .*the model has \(8, .*z: shape \(4, 6\)"):
        S.loss_and_grads(p, x, y, [0, 1], S.Config(**dict(SMALL, z_dim=8)))
    with pytest.raises(ValueError, match='gen.h1.w: missing'):
        S.loss_and_grads(p, x, y, [0, 1], S.Config(**dict(SMALL, gen_hidden=(7,))))


def test_checkpoint_of_another_dtype_or_with_nan_is_refused(tmp_path):
    cfg = S.Config(**SMALL)
    p = S.init_params(cfg, seed=0)
    S.save_checkpoint(tmp_path / 'f64.npz', {k: v.astype(np.float64) for k, v in p.items()}, cfg)
    with pytest.raises(S.CheckpointError, match='gen.out.w: checkpoint dtype float64 vs model float32'):
        S.load_checkpoint(tmp_path / 'f64.npz', cfg=cfg, params_like=p)
    p['z'][1, 2] = np.nan
    S.save_checkpoint(tmp_path / 'nan.npz', p, cfg)
    with pytest.raises(S.CheckpointError, match='NaN or inf in z'):
        S.load_checkpoint(tmp_path / 'nan.npz', cfg=cfg)
