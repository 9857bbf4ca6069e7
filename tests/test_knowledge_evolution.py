"""Knowledge Evolution (knowledge_evolution.py): the fit/reset split, re-initialisation of the
reset hypothesis only, the slim network (with kels a real narrower network), and a tiny
2-generation run that resumes from its saved generations."""
import math
import os

import numpy as np
import pytest

import data
import knowledge_evolution as KE
import supernet as S
import train as T
from nn.backend import get_xp, to_device, to_host
from nn.gradcheck import rel_error
from tests.strict_xp import strict


def _fit_block(mask, block):
    """True iff mask is True exactly on the index block."""
    ref = np.zeros_like(mask)
    ref[block] = True
    return np.array_equal(mask, ref)


def test_kels_masks_of_the_original_classifier():
    cfg = S.Config()
    m = KE.make_masks(cfg, 'kels', 0.5)
    assert list(m) == [name for name, _ in S.classifier_shapes(cfg)]
    assert all(m[k].dtype == bool and m[k].shape == s for k, s in S.classifier_shapes(cfg))
    # conv1 (5,5,3,16): every image channel, the first 8 filters
    assert _fit_block(m['conv1.w'], np.s_[:, :, :, :8]) and m['conv1.w'].sum() == 25 * 3 * 8
    for i in (2, 3, 4):                                   # (5,5,16,16): 8 x 8 filters
        assert _fit_block(m[f'conv{i}.w'], np.s_[:, :, :8, :8]) and m[f'conv{i}.w'].sum() == 25 * 64
    for i in (1, 2, 3, 4):
        assert _fit_block(m[f'conv{i}.b'], np.s_[:8])
    # fc1 (64, 100): the input is the flattened (2, 2, 16) NHWC map: rows of channels 0..7
    rows = np.array([r for r in range(64) if r % 16 < 8])
    assert len(rows) == 32
    assert _fit_block(m['fc1.w'], np.ix_(rows, np.arange(50)))
    assert _fit_block(m['fc2.w'], np.s_[:50, :50]) and _fit_block(m['fc1.b'], np.s_[:50])
    assert _fit_block(m['out.w'], np.s_[:50, :]) and m['out.b'].all()        # the output unit: fit
    assert KE.count_fit(m) == 600 + 3 * 1600 + 4 * 8 + 1600 + 50 + 2500 + 50 + 50 + 1


def test_kels_rounds_up_and_handles_uneven_widths():
    cfg = S.Config(image_shape=(8, 8, 3), conv_filters=(5, 7), kernel=3, fc=(9,), z_dim=6, n_tasks=2)
    m = KE.make_masks(cfg, 'kels', 0.3)                   # ceil(1.5) = 2, ceil(2.1) = 3, ceil(2.7) = 3
    assert _fit_block(m['conv1.w'], np.s_[:, :, :, :2])
    assert _fit_block(m['conv2.w'], np.s_[:, :, :2, :3])
    rows = np.array([r for r in range(2 * 2 * 7) if r % 7 < 3])
    assert _fit_block(m['fc1.w'], np.ix_(rows, np.arange(3)))
    assert _fit_block(m['out.w'], np.s_[:3, :])


@pytest.mark.parametrize('s', [0.5, 0.3])
def test_wels_masks_have_round_s_n_ones_and_are_seeded(s):
    cfg = S.Config()
    m = KE.make_masks(cfg, 'wels', s, np.random.default_rng(3))
    for name, shape in S.classifier_shapes(cfg):
        assert m[name].shape == shape and m[name].sum() == round(s * int(np.prod(shape))), name
    again = KE.make_masks(cfg, 'wels', s, np.random.default_rng(3))
    other = KE.make_masks(cfg, 'wels', s, np.random.default_rng(4))
    assert all(np.array_equal(m[k], again[k]) for k in m)
    assert not np.array_equal(m['fc1.w'], other['fc1.w'])
    w = m['conv2.w']                                      # scattered, not a block
    assert 0 < w[:, :, :8, :8].sum() < w.sum()


def test_bad_arguments():
    with pytest.raises(ValueError, match='split mode'):
        KE.make_masks(S.Config(), 'layer')
    with pytest.raises(ValueError, match='split_rate'):
        KE.make_masks(S.Config(), 'kels', 0.0)


@pytest.mark.parametrize('mode', ['kels', 'wels'])
def test_reinit_touches_only_the_reset_hypothesis(mode):
    cfg = S.Config()
    r = np.random.default_rng(0)
    w = {k: (v + r.normal(0, 0.5, size=v.shape)).astype(np.float32)        # "trained": non-zero biases
         for k, v in S.init_classifier(cfg, r).items()}
    before = {k: v.copy() for k, v in w.items()}
    masks = KE.make_masks(cfg, mode, 0.5, np.random.default_rng(1))
    ids = {k: id(v) for k, v in w.items()}
    KE.reinit_reset(w, masks, np.random.default_rng(2), cfg)
    for name, shape in S.classifier_shapes(cfg):
        m = masks[name]
        assert id(w[name]) == ids[name] and w[name].dtype == np.float32       # in place
        assert np.array_equal(w[name][m], before[name][m]), name               # fit: bit for bit
        reset = w[name][~m]
        if len(shape) == 1:
            assert np.all(reset == 0), name                                    # biases reset to zero
        else:
            assert np.all(reset != before[name][~m]), name                    # every reset weight redrawn
            lim = S._glorot_limit(name, shape)
            assert np.abs(reset).max() <= lim and reset.std() > 0.5 * lim / np.sqrt(3), name


def test_slim_is_dense_times_mask_and_kels_slim_is_the_narrower_network():
    cfg = S.Config()
    r = np.random.default_rng(0)
    w = {k: v + r.normal(0, 0.05, size=v.shape) for k, v in S.init_classifier(cfg, r, np.float64).items()}
    masks = KE.make_masks(cfg, 'kels', 0.5)
    sl = KE.slim(w, masks)
    for k in w:
        assert np.array_equal(sl[k], w[k] * masks[k])
    assert not np.array_equal(sl['fc1.w'], w['fc1.w'])    # the dense weights are untouched
    # the same network, built narrow: 8 filters per conv, 50 units per fc
    ncfg = S.Config(conv_filters=(8, 8, 8, 8), fc=(50, 50))
    nw = {'conv1.w': w['conv1.w'][..., :8]}
    for i in (2, 3, 4):
        nw[f'conv{i}.w'] = w[f'conv{i}.w'][:, :, :8, :8]
    for i in (1, 2, 3, 4):
        nw[f'conv{i}.b'] = w[f'conv{i}.b'][:8]
    nw['fc1.w'] = w['fc1.w'].reshape(4, 16, 100)[:, :8, :50].reshape(32, 50)
    nw['fc2.w'], nw['out.w'] = w['fc2.w'][:50, :50], w['out.w'][:50]
    nw['fc1.b'], nw['fc2.b'], nw['out.b'] = w['fc1.b'][:50], w['fc2.b'][:50], w['out.b']
    x = r.normal(size=(6, 32, 32, 3))
    narrow = S.baseline_logits(nw, x, ncfg)
    assert rel_error(S.baseline_logits(sl, x, cfg), narrow) < 1e-12
    assert sum(v.size for v in nw.values()) == KE.count_fit(masks)
    assert rel_error(T.baseline_logits_fn(sl, cfg)(x), narrow) < 1e-12


@pytest.mark.parametrize('mode', ['kels', 'wels'])
def test_reinit_and_slim_run_on_the_strict_device_and_match_numpy(mode):
    """reinit_reset and slim with the weights on the strict CuPy stand-in (the masks are
    host arrays: each must be moved, never mixed): the same numbers as on the host, and
    the weights stay on the device (reinit_reset still in place)."""
    cfg = S.Config()
    r = np.random.default_rng(0)
    w = {k: v + r.normal(0, 0.5, size=v.shape).astype(np.float32) for k, v in S.init_classifier(cfg, r).items()}
    masks = KE.make_masks(cfg, mode, 0.5, np.random.default_rng(1))
    host = {k: v.copy() for k, v in w.items()}
    dev = {k: to_device(v, strict) for k, v in w.items()}
    ids = {k: id(v) for k, v in dev.items()}
    KE.reinit_reset(host, masks, np.random.default_rng(2), cfg)
    KE.reinit_reset(dev, masks, np.random.default_rng(2), cfg)
    sl_host, sl_dev = KE.slim(host, masks), KE.slim(dev, masks)
    for k in w:
        assert id(dev[k]) == ids[k] and get_xp(dev[k]) is strict and get_xp(sl_dev[k]) is strict, k
        assert np.array_equal(to_host(dev[k]), host[k]) and np.array_equal(to_host(sl_dev[k]), sl_host[k]), k
        assert to_host(dev[k]).dtype == np.float32, k


# --------------------------------------------------------------------------- a tiny run

@pytest.fixture(scope='module')
def taskset(tiny_cifar_dir):
    return data.TaskSet(data.load_cifar100(tiny_cifar_dir), data.exp1_tasks())


def _run(path, taskset, generations, resume=False, **kw):
    run = T.RunDir(str(path), resume=resume, quiet=True)
    return run, KE.run_knowledge_evolution(run, 'ke/T3', S.Config(), taskset, 3, np, steps_per_gen=4,
                                           generations=generations, batch=4, log_every=2, eval_every=4, **kw)


def _strip(res):
    return [{k: v for k, v in g.items() if k != 'wall_s'} for g in res['generations']]


def test_two_generations_on_the_tiny_set_and_resume(tmp_path, taskset):
    run, res = _run(tmp_path / 'r', taskset, 2)
    assert [g['gen'] for g in res['generations']] == [1, 2]
    for g in res['generations']:
        for k in ('dense_test_acc', 'slim_test_acc'):
            assert 0 <= g[k] <= 1
        assert math.isfinite(g['dense_test_loss']) and math.isfinite(g['slim_test_loss'])
    assert res['test_acc'] == res['generations'][-1]['dense_test_acc']
    assert res['test_loss'] == res['generations'][-1]['dense_test_loss']
    assert res['trainable'] == 37165
    assert res['slim_params'] == KE.count_fit(KE.make_masks(S.Config(), 'kels', 0.5))
    assert [(r['gen'], r['step']) for r in res['curve'] if 'test_acc' in r] == [(1, 0), (1, 4), (2, 0), (2, 4)]
    assert [r['total_step'] for r in res['curve']] == [0, 2, 4, 4, 6, 8]
    assert run.done('ke/T3/gen1') and run.done('ke/T3/gen2')
    for g in (1, 2):
        assert (tmp_path / 'r' / f'ke_T3_gen{g}.npz').exists()
    assert not (tmp_path / 'r' / 'ckpt' / 'ke_T3_gen2.npz').exists()
    # resumed with one more generation: generations 1-2 are reloaded, not retrained, and
    # generation 3 continues from the saved weights exactly as a straight 3-generation run
    _, res3 = _run(tmp_path / 'r', taskset, 3, resume=True)
    assert _strip(res3)[:2] == _strip(res)
    assert [g['wall_s'] for g in res3['generations'][:2]] == [g['wall_s'] for g in res['generations']]
    _, straight = _run(tmp_path / 's', taskset, 3)
    assert _strip(res3) == _strip(straight)



def test_recorded_figures_are_the_saved_networks_on_the_test_split(tmp_path, taskset):
    """Each generation's recorded dense / slim figures are exactly those of its saved weights,
    and of their slim network (the fit hypothesis only), on the task's TEST split: the train
    split, or the dense weights standing in for the slim ones, give other figures here."""
    cfg = S.Config()
    _, res = _run(tmp_path / 'r', taskset, 2)
    masks = KE.make_masks(cfg, 'kels', 0.5)

    def figures(w, split):
        return T.evaluate(T.baseline_logits_fn(w, cfg), taskset, 3, split, np)

    for g in res['generations']:
        w = S.load_checkpoint(str(tmp_path / 'r' / f"ke_T3_gen{g['gen']}.npz"), cfg=cfg)[0]
        dense, slim = figures(w, 'test'), figures(KE.slim(w, masks), 'test')
        assert (g['dense_test_loss'], g['dense_test_acc']) == dense
        assert (g['slim_test_loss'], g['slim_test_acc']) == slim
        assert figures(w, 'train') != dense and slim != dense       # so the two checks above can fail


def test_damaged_or_missing_generation_file_is_trained_again_on_resume(tmp_path, taskset):
    """A generation file that is corrupt gives a message whose advice works: delete it,
    resume, and the generation is trained again to the same weights; a missing one is
    retrained at once. The files get the umask's mode, not mkstemp's 0600."""
    _, res = _run(tmp_path / 'r', taskset, 2)
    gen2 = tmp_path / 'r' / 'ke_T3_gen2.npz'
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(gen2).st_mode & 0o777 == 0o666 & ~umask
    saved = dict(np.load(gen2))
    gen2.write_bytes(b'not an npz')
    with pytest.raises(S.CheckpointError) as e:
        _run(tmp_path / 'r', taskset, 2, resume=True)
    msg = str(e.value)
    assert str(gen2) in msg and 'delete it and run the same command with --resume' in msg
    assert "generation 2 is then trained again from generation 1's weights" in msg
    gen2.unlink()
    _, again = _run(tmp_path / 'r', taskset, 2, resume=True)
    assert _strip(again) == _strip(res)
    assert all(np.array_equal(v, np.load(gen2)[k]) for k, v in saved.items() if k != 'meta')
    # a file of another model is not called damaged: its message names what differs
    S.save_checkpoint(str(tmp_path / 'r' / 'ke_T3_gen1.npz'),
                      S.init_classifier(S.Config(fc=(50, 50)), np.random.default_rng(0)), S.Config(fc=(50, 50)))
    with pytest.raises(S.CheckpointError, match='fc') as e:
        _run(tmp_path / 'r', taskset, 2, resume=True)
    assert 'corrupt' not in str(e.value)

def _record_stages(monkeypatch):
    """Wrap train.train_stage (as knowledge_evolution calls it) to keep host copies of the
    weights at the start and the end of every stage: {stage: (start, end)}."""
    seen, train_stage = {}, T.train_stage

    def recording(run, stage, weights, *args, **kw):
        start = {k: to_host(v).copy() for k, v in weights.items()}
        curve = train_stage(run, stage, weights, *args, **kw)
        seen[stage] = (start, {k: to_host(v).copy() for k, v in weights.items()})
        return curve
    monkeypatch.setattr(T, 'train_stage', recording)
    return seen


@pytest.mark.parametrize('mode,s', [('kels', 0.5), ('wels', 0.3)])
def test_generation_boundary_keeps_fit_and_reinitialises_reset(tmp_path, taskset, monkeypatch, mode, s):
    """Generation 2 starts from M * w_trained + (1 - M) * w_fresh: the fit hypothesis as
    generation 1 left it, bit for bit, and the reset hypothesis equal to a fresh
    supernet.init_classifier draw (rng [seed, task, 7, 2], as documented), not to the
    trained weights and not to generation 1's start."""
    seen = _record_stages(monkeypatch)
    _, res = _run(tmp_path / mode, taskset, 2, mode=mode, split_rate=s, lr=3e-3)
    assert res['mode'] == mode and res['split_rate'] == s
    cfg = S.Config()
    masks = KE.make_masks(cfg, mode, s, np.random.default_rng([0, 3, 5]))     # seed 0, task 3
    assert res['slim_params'] == KE.count_fit(masks)
    if mode == 'wels':
        assert res['slim_params'] == sum(round(s * int(np.prod(sh))) for _, sh in S.classifier_shapes(cfg))
    start1, trained = seen['ke/T3/gen1']
    start2, _ = seen['ke/T3/gen2']
    init = S.init_classifier(cfg, np.random.default_rng([0, 3, 7]))
    fresh = S.init_classifier(cfg, np.random.default_rng([0, 3, 7, 2]))
    for k, m in masks.items():
        assert np.array_equal(start1[k], init[k]), k                           # generation 1's start
        assert np.array_equal(start2[k], np.where(m, trained[k], fresh[k])), k
        assert start2[k].dtype == trained[k].dtype, k
        # the check has teeth: training moved the fit part, and every reset weight differs
        # from what training left there (biases too: trained ones are not 0)
        assert m.sum() == 0 or not np.array_equal(trained[k][m], init[k][m]), k
        assert np.all(trained[k][~m] != fresh[k][~m]), k


def test_two_generations_on_the_strict_device_equal_numpy(tmp_path, taskset):
    """The whole Knowledge Evolution run (training, reset, slim evaluation) with the
    weights and batches on the strict CuPy stand-in gives the host run's results."""
    out = {}
    for xp in (np, strict):
        run = T.RunDir(str(tmp_path / ('np' if xp is np else 'dev')), resume=False, quiet=True)
        out[xp] = KE.run_knowledge_evolution(run, 'ke/T3', S.Config(), taskset, 3, xp, steps_per_gen=2,
                                             generations=2, batch=4, log_every=1, eval_every=2)
    host, dev = _strip(out[np]), _strip(out[strict])
    assert [g['gen'] for g in dev] == [1, 2]
    for gh, gd in zip(host, dev):
        for k in gh:
            if k.endswith('_acc') or k == 'gen':
                assert gh[k] == gd[k], k                      # the same predictions
            else:                                               # float32 losses: the host cuts its products
                assert gh[k] == pytest.approx(gd[k], rel=1e-6, abs=0), k   # for OpenBLAS (a few ulps apart)
