"""The task-conditional static hypernetwork (hyper.py): its forward against the paper's
formula written as loops, the whole backward (loss -> theta -> hypernetwork parameters,
chunk codes and task z) against finite differences in float64, parameter counts, the init
scale, z-only adaptation with a bit-for-bit frozen hypernetwork, and the device path."""
import numpy as np
import pytest

import hyper as H
import supernet as S
from nn.backend import to_device, to_host
from nn.gradcheck import rel_error
from nn.optim import Optimizer
from tests.toy import random_batch, toy_tasks

TOL = 1e-6

# conv2 maps 3 -> 20 filters: with 16-channel chunks it spans 1 x 2 tiles (cropped to 3 x 20)
SMALL = dict(image_shape=(8, 8, 3), conv_filters=(3, 20), kernel=3, fc=(5,), z_dim=6, n_tasks=3)
# chunk 8 with 3 -> 20 -> 12 filters: conv2 1 x 3 tiles, conv3 3 x 2 tiles (several input tiles)
MULTI = dict(image_shape=(8, 8, 3), conv_filters=(3, 20, 12), kernel=3, fc=(5,), z_dim=6, n_tasks=3)


def _random_params(cfg, hcfg, seed):
    r = np.random.default_rng(seed)
    p = H.hyper_init_params(cfg, hcfg, seed=seed, dtype=np.float64)
    p['z'] = r.normal(size=p['z'].shape)
    for k in p:
        if k.endswith(('.b', 'B_in', 'B_out')):
            p[k] = r.normal(0, 0.1, size=p[k].shape)
    return p


# --------------------------------------------------------------------------- forward

def _reference_kernel(p, z_task, name, shape, j0, ti, to, hcfg, f, tanh):
    """The paper's formula, one chunk and one input channel at a time."""
    c = hcfg.chunk
    full = np.zeros((f, f, ti * c, to * c))
    for pi in range(ti):
        for q in range(to):
            z = p['gen.hyp.codes'][j0 + pi * to + q] + p['gen.hyp.A'] @ z_task
            for i in range(c):
                a_i = p['gen.hyp.W_in'][i] @ z + p['gen.hyp.B_in'][i]
                K_i = a_i @ p['gen.hyp.W_out'] + p['gen.hyp.B_out']
                K_i = np.tanh(K_i) if tanh else K_i
                full[:, :, pi * c + i, q * c:(q + 1) * c] = K_i.reshape(f, f, c)
    return full[:, :, :shape[2], :shape[3]]


@pytest.mark.parametrize('kw,chunk,output', [(SMALL, 16, 'linear'), (MULTI, 8, 'tanh'),
                                             (dict(n_tasks=3), 16, 'linear')])
def test_forward_is_the_papers_formula_tiled_and_cropped(kw, chunk, output):
    cfg, hcfg = S.Config(**kw), H.HyperConfig(nz=5, d=7, chunk=chunk, output=output)
    p = _random_params(cfg, hcfg, 0)
    Z = p['z'][[2, 0]]
    theta, _ = H.hyper_forward(Z, p, cfg, hcfg)
    w = S.split_theta(theta, cfg)
    tiles, n = H.conv_tiles(cfg, hcfg)
    for name, shape, j0, ti, to in tiles:
        assert (ti, to) == (-(-shape[2] // chunk), -(-shape[3] // chunk))
        for g in range(2):
            ref = _reference_kernel(p, Z[g], name, shape, j0, ti, to, hcfg, cfg.kernel, output == 'tanh')
            assert rel_error(w[name][g], ref) < 1e-13, name
    for name in H.shared_names(cfg):                     # shared tensors: the same in every row
        for g in range(2):
            assert np.array_equal(w[name][g], p[f'gen.shared.{name}'])
    assert {name for name, *_ in tiles} == {k for k, s in S.classifier_shapes(cfg) if len(s) == 4}


def test_tile_counts():
    _, n = H.conv_tiles(S.Config(**SMALL), H.HyperConfig())
    assert n == 1 + 2                                    # conv1 1 x 1, conv2 1 x 2
    _, n = H.conv_tiles(S.Config(**MULTI), H.HyperConfig(chunk=8))
    assert n == 1 + 3 + 6
    _, n = H.conv_tiles(S.Config(), H.HyperConfig())
    assert n == 4                                        # one 16 x 16 chunk per conv layer


# --------------------------------------------------------------------------- gradients

@pytest.mark.parametrize('output', ['linear', 'tanh'])
def test_gradcheck_small_mixed_batch_every_coordinate(output):
    """Every coordinate of every parameter (hypernetwork, codes, A, shared, z), 2 tasks
    mixed in one batch; tanh with kernels large enough that it is far from linear."""
    cfg, hcfg = S.Config(**SMALL), H.HyperConfig(nz=8, d=8, output=output)
    errs = H.hyper_gradient_check(cfg, hcfg, [2, 0], n_samples=None,
                                  w_out_scale=8.0 if output == 'tanh' else 1.0)
    assert set(errs) == set(H.hyper_init_params(cfg, hcfg))
    assert max(errs.values()) < TOL, errs


def test_gradcheck_several_input_tiles_single_task():
    cfg, hcfg = S.Config(**MULTI), H.HyperConfig(nz=6, d=5, chunk=8, output='tanh')
    errs = H.hyper_gradient_check(cfg, hcfg, [1], n_samples=150, w_out_scale=4.0)
    assert max(errs.values()) < TOL, errs


def test_gradcheck_refuses_vacuous_or_leaking_z(monkeypatch):
    """The check samples z only in the batch's rows, demands exact zeros in the others,
    and raises where the sampled numerical gradient is 0 (a check that proves nothing)."""
    cfg, hcfg = S.Config(**SMALL), H.HyperConfig(nz=8, d=8, output='linear')
    real = H.hyper_loss_and_grads

    def leaking(p, x, y, tasks, cfg, hcfg):
        loss, grads, logits = real(p, x, y, tasks, cfg, hcfg)
        grads['z'][1, 0] = 1e-3                      # the row of task 1, outside the batch [2, 0]
        return loss, grads, logits
    monkeypatch.setattr(H, 'hyper_loss_and_grads', leaking)
    with pytest.raises(RuntimeError, match='outside the batch'):
        H.hyper_gradient_check(cfg, hcfg, [2, 0], n_samples=5, keys=['z'])
    monkeypatch.setattr(H, 'hyper_loss_and_grads', real)
    monkeypatch.setattr(H, 'hyper_loss', lambda *a: 0.0)    # a loss that ignores the parameters
    with pytest.raises(RuntimeError, match='proves nothing|prove nothing'):
        H.hyper_gradient_check(cfg, hcfg, [2, 0], n_samples=5, keys=['z'])


@pytest.mark.parametrize('output', ['linear', 'tanh'])
def test_gradcheck_original_config(output):
    """The original classifier (37,165 weights), default HyperConfig, 2 tasks; 100 sampled
    coordinates of every hypernetwork tensor and z, 25 of each shared tensor."""
    cfg, hcfg = S.Config(n_tasks=5), H.HyperConfig(output=output)
    scale = 2.5 if output == 'tanh' else 2.0        # kernels ~2x Glorot: tanh clearly non-linear
    hyp = [k for k in H.hyper_shapes(cfg, hcfg) if k.startswith('gen.hyp.')] + ['z']
    errs = H.hyper_gradient_check(cfg, hcfg, [1, 4], m=1, n_samples=100, w_out_scale=scale, keys=hyp)
    errs.update(H.hyper_gradient_check(cfg, hcfg, [1, 4], m=1, n_samples=25, w_out_scale=scale,
                                       keys=['gen.shared.' + n for n in H.shared_names(cfg)]))
    assert len(errs) == len(H.hyper_shapes(cfg, hcfg)) + 1
    assert max(errs.values()) < TOL, errs


def test_z_only_gradient_matches_the_full_one():
    cfg, hcfg = S.Config(**SMALL), H.HyperConfig(nz=8, d=8)
    p = _random_params(cfg, hcfg, 7)
    x, y = random_batch(cfg, 2, 3, 8)
    _, g_full, _ = H.hyper_loss_and_grads(p, x, y, [0, 1], cfg, hcfg)
    _, g_z, _ = H.hyper_loss_and_grads(p, x, y, [0, 1], cfg, hcfg, need_gen_grads=False)
    assert set(g_full) == set(p) and set(g_z) == {'z'}
    assert np.array_equal(g_full['z'], g_z['z'])
    assert np.all(g_full['z'][2] == 0)                   # an absent task gets no gradient
    _, g_Z, _ = H.hyper_loss_and_grads(p, x, y, [0, 1], cfg, hcfg, Z=p['z'][[0, 1]])
    assert 'z' not in g_Z and np.array_equal(g_Z['Z'], g_full['z'][[0, 1]])


# (a mixed step equals the mean of single-task steps: tests/test_supernet.py, both generators)


# --------------------------------------------------------------------------- counts, init

def test_parameter_count_is_far_below_the_supernet_generator():
    cfg, hcfg = S.Config(), H.HyperConfig()
    n = H.hyper_count(cfg, hcfg)
    p = H.hyper_init(cfg, hcfg, np.random.default_rng(0))
    assert n == sum(v.size for v in p.values())
    assert all(tuple(v.shape) == s for v, s in zip(p.values(), H.hyper_shapes(cfg, hcfg).values()))
    gen = S.count_params(cfg)['generator']
    assert gen == 3753665
    # 4 chunks: codes 4*64 + A 64*100 + W_in 16*64*64 + B_in 16*64 + W_out 64*400 + B_out 400,
    # plus the shared conv biases 4*16 and fc1, fc2, out (16,765)
    assert n == 256 + 6400 + 65536 + 1024 + 25600 + 400 + 16765 == 115981
    assert n * 30 < gen
    print(f"\nhypernetwork {n:,} parameters vs SuperNet generator {gen:,}")


def test_generated_kernels_have_roughly_the_glorot_scale():
    cfg, hcfg = S.Config(n_tasks=3), H.HyperConfig()
    p = H.hyper_init_params(cfg, hcfg, seed=0)
    assert all(v.dtype == np.float32 for v in p.values())
    w = S.split_theta(H.hyper_forward(p['z'], p, cfg, hcfg)[0], cfg)
    for name, shape in S.classifier_shapes(cfg):
        if len(shape) == 4:
            glorot_std = np.sqrt(6 / (shape[0] * shape[1] * (shape[2] + shape[3]))) / np.sqrt(3)
            ratio = float(w[name].std()) / glorot_std
            assert 0.6 < ratio < 1.3, (name, ratio)
            assert not np.allclose(w[name][0], w[name][1])          # each task its own kernels
    init = S.init_classifier(cfg, np.random.default_rng(1))
    assert abs(float(w['fc1.w'].std()) / float(init['fc1.w'].std()) - 1) < 0.1


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match='output'):
        H.HyperConfig(output='relu')
    with pytest.raises(ValueError, match='chunk'):
        H.HyperConfig(chunk=0)
    with pytest.raises(ValueError, match='an integer'):
        H.HyperConfig(chunk=2.7)                 # not silently truncated to 2
    assert H.HyperConfig(nz=3.0).nz == 3
    with pytest.raises(ValueError, match='no conv layer'):
        H.hyper_init_params(S.Config(image_shape=(4, 4, 3), conv_filters=(), fc=(5,), z_dim=4, n_tasks=2),
                            H.HyperConfig(nz=3, d=3))
    assert H.HyperConfig.from_dict(H.HyperConfig(nz=3).to_dict()) == H.HyperConfig(nz=3)


# --------------------------------------------------------------------------- training

def _train(p, cfg, hcfg, x, y, tasks, steps, keys=None, lr=3e-3, need_gen=True):
    opt = Optimizer('adam', learning_rate=lr)
    losses = []
    for _ in range(steps):
        loss, g, _ = H.hyper_loss_and_grads(p, x, y, tasks, cfg, hcfg, need_gen_grads=need_gen)
        opt.step(p, g, keys=keys)
        losses.append(float(loss))
    return losses


def test_learns_toy_tasks_and_z_only_adapts_with_a_frozen_hypernetwork():
    cfg = S.Config(image_shape=(8, 8, 3), conv_filters=(8, 8), kernel=3, fc=(16,), z_dim=6, n_tasks=4)
    hcfg = H.HyperConfig(nz=8, d=16, chunk=8)
    p = H.hyper_init_params(cfg, hcfg, seed=0)
    x, y = toy_tasks(cfg, 4, 32, seed=1)
    losses = _train(p, cfg, hcfg, x[:3], y[:3], [0, 1, 2], steps=250)
    _, _, logits = H.hyper_loss_and_grads(p, x[:3], y[:3], [0, 1, 2], cfg, hcfg)
    acc = float(((logits > 0) == (y[:3] > 0.5)).mean())
    assert acc > 0.9, (acc, losses[-1])
    frozen = {k: v.copy() for k, v in p.items() if k != 'z'}
    z_before = p['z'].copy()
    l0 = float(H.hyper_loss_and_grads(p, x[3:], y[3:], [3], cfg, hcfg)[0])
    zl = _train(p, cfg, hcfg, x[3:], y[3:], [3], steps=150, keys=['z'], lr=3e-2, need_gen=False)
    assert zl[-1] < 0.5 * l0, (l0, zl[-1])
    assert all(k.startswith('gen.') for k in frozen)
    for k, v in frozen.items():
        assert np.array_equal(p[k], v), f'{k} changed during z-only training'
    assert not np.array_equal(p['z'][3], z_before[3])
    assert np.array_equal(p['z'][:3], z_before[:3])


# --------------------------------------------------------------------------- device

def test_runs_on_the_strict_device_and_matches_numpy():
    from tests.strict_xp import strict
    cfg, hcfg = S.Config(**SMALL), H.HyperConfig(nz=8, d=8, output='tanh')
    p = _random_params(cfg, hcfg, 5)
    x, y = random_batch(cfg, 2, 3, 6)
    loss, g, logits = H.hyper_loss_and_grads(p, x, y, [2, 1], cfg, hcfg)
    pd = {k: to_device(v, strict) for k, v in p.items()}
    lossd, gd, logitsd = H.hyper_loss_and_grads(pd, to_device(x, strict), to_device(y, strict),
                                                [2, 1], cfg, hcfg)
    assert rel_error(to_host(lossd), loss) < 1e-14 and rel_error(to_host(logitsd), logits) < 1e-14
    for k in g:
        assert rel_error(to_host(gd[k]), g[k]) < 1e-14, k
    f = H.hyper_logits_fn(pd, cfg, hcfg, pd['z'][2])
    assert rel_error(to_host(f(to_device(x[0], strict))), logits[0]) < 1e-13
