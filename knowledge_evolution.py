"""Knowledge Evolution (Taha, Shrivastava & Davis, "Knowledge Evolution in Neural Networks",
CVPR 2021) for the whole-network baseline: the directly trained classifier of supernet.py.

Each layer's weights are split by a fixed binary mask M into the fit hypothesis H_fit (M = 1)
and the reset hypothesis H_reset (M = 0). Generation 1 trains the whole network as usual.
Every next generation keeps H_fit, re-initialises H_reset and retrains the whole network:

    w <- M * w + (1 - M) * w_fresh,     w_fresh ~ supernet.init_classifier (Glorot-uniform, zero bias)

After the last generation H_fit alone is the "slim" network (reset weights zeroed).

Split modes (make_masks):
  'wels'  weight-level: per tensor, exactly round(s * n) randomly placed ones (Python's round,
          half to even: a 1-element tensor at s = 0.5 is all reset); seeded by `rng`.
  'kels'  kernel-level (the paper's default): the first ceil(s * F) units of every layer are
          fit, together with the weights that connect them to the previous layer's fit units:
            conv w (kh, kw, C_in, C_out): w[:, :, :fit_in, :ceil(s*C_out)]
            dense w (D, F):               w[:fit_in, :ceil(s*F)]
            bias (F,):                    b[:ceil(s*F)]
          where fit_in is the previous layer's fit count, which for the second layer on is
          ceil(s*C_in) (s*D) and for conv1 is ALL image channels (as the authors' code does for a
          3-channel first conv: the slim network must see the whole image);
          fc1's input is the flattened NHWC conv output, index r = (y*W + x)*C + c: row r is fit
          iff its channel r % C is a fit channel of the last conv, at every position (y, x);
          the out layer's single output unit is always fit (out.w[:fit_in, :], out.b[:]).
        With kels, zeroing H_reset gives exactly a narrower network (ceil(s*C) filters per conv,
        ceil(s*F) units per fc), the paper's slim network.
Masks are host numpy bool arrays of each tensor's shape, keys as the classifier's tensors.
"""
import math
import os
import time
from types import SimpleNamespace

import numpy as np

import supernet as S
import train as T
from nn.backend import get_xp, to_device
from nn.optim import Optimizer


# =========================================================================== masks

def _wels_mask(shape, split_rate, rng):
    """Exactly round(s * n) ones at random positions."""
    n = int(np.prod(shape))
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[:round(split_rate * n)]] = True
    return mask.reshape(shape)


def _kels_masks(cfg, split_rate):
    """The kernel-level masks (see the module docstring), layer by layer."""
    fit = lambda k: math.ceil(split_rate * k)
    shapes = dict(S.classifier_shapes(cfg))
    masks = {}
    fit_in = cfg.image_shape[2]                               # conv1 sees every image channel
    for i in range(1, len(cfg.conv_filters) + 1):
        w = np.zeros(shapes[f'conv{i}.w'], dtype=bool)
        f_out = fit(w.shape[3])
        w[:, :, :fit_in, :f_out] = True
        b = np.zeros(shapes[f'conv{i}.b'], dtype=bool)
        b[:f_out] = True
        masks[f'conv{i}.w'], masks[f'conv{i}.b'] = w, b
        fit_in = f_out
    C = cfg.conv_filters[-1] if cfg.conv_filters else cfg.image_shape[2]
    D = shapes['fc1.w' if cfg.fc else 'out.w'][0]
    in_rows = (np.arange(D) % C) < fit_in                    # flatten -> fc: map by channel
    for name in [f'fc{j}' for j in range(1, len(cfg.fc) + 1)] + ['out']:
        w = np.zeros(shapes[f'{name}.w'], dtype=bool)
        f_out = w.shape[1] if name == 'out' else fit(w.shape[1])    # the output unit: always fit
        w[:, :f_out] = in_rows[:, None]
        b = np.zeros(shapes[f'{name}.b'], dtype=bool)
        b[:f_out] = True
        masks[f'{name}.w'], masks[f'{name}.b'] = w, b
        in_rows = np.arange(w.shape[1]) < f_out
    return masks


def make_masks(cfg, mode='kels', split_rate=0.5, rng=None):
    """{classifier tensor name: bool array of its shape}, True = fit hypothesis.

    mode: 'kels' (kernel-level, deterministic) or 'wels' (weight-level, random: rng, a numpy
    Generator, default np.random.default_rng(0)); split_rate s in (0, 1].
    """
    if not 0 < split_rate <= 1:
        raise ValueError(f"split_rate must be in (0, 1], got {split_rate}")
    if mode == 'kels':
        masks = _kels_masks(cfg, split_rate)
    elif mode == 'wels':
        rng = np.random.default_rng(0) if rng is None else rng
        masks = {name: _wels_mask(shape, split_rate, rng) for name, shape in S.classifier_shapes(cfg)}
    else:
        raise ValueError(f"split mode must be 'kels' or 'wels', got {mode!r}")
    return {name: masks[name] for name, _ in S.classifier_shapes(cfg)}      # the classifier's order


def count_fit(masks):
    """Number of weights in the fit hypothesis (the slim network's parameters)."""
    return int(sum(int(m.sum()) for m in masks.values()))


# =========================================================================== reset, slim

def reinit_reset(weights, masks, rng, cfg):
    """Re-initialise the reset hypothesis IN PLACE with supernet.init_classifier's distribution
    (Glorot-uniform weights, zero biases); the fit hypothesis is left bit-for-bit unchanged.
    weights {name: array} on any device; masks {name: bool host array}. Returns weights."""
    dtype = np.dtype(next(iter(weights.values())).dtype).type
    fresh = S.init_classifier(cfg, rng, dtype=dtype)
    for name, w in weights.items():
        xp = get_xp(w)
        w[...] = xp.where(to_device(masks[name], xp), w, to_device(fresh[name], xp))
    return weights


def slim(weights, masks):
    """The fit hypothesis alone: {name: w * mask} (new arrays; with kels, the narrower net)."""
    out = {}
    for name, w in weights.items():
        xp = get_xp(w)
        out[name] = w * to_device(masks[name].astype(w.dtype), xp)
    return out


# =========================================================================== training

def _gen_path(run, name, g):
    return os.path.join(run.path, f'{name}_gen{g}.npz'.replace('/', '_'))


def run_knowledge_evolution(run, name, cfg, taskset, task, xp, steps_per_gen, generations=5,
                            split_rate=0.5, mode='kels', lr=1e-3, optimizer='rmsprop', seed=0,
                            eval_every=0, log_every=0, ckpt_every=0, batch=20):
    """Knowledge Evolution of the whole-network baseline on one task; resumable.

    run: train.RunDir; name: stage prefix (generation g is the stage f'{name}/gen{g}');
    task: a task id of taskset; steps_per_gen: training steps per generation (e in the paper);
    eval_every/log_every/ckpt_every: 0 = the run scripts' defaults (train.intervals).
    Generation 1 starts from supernet.init_classifier with np.random.default_rng([seed, task, 7])
    (the whole-network baseline's start in train.adapt). Each generation: a fresh optimizer;
    generation g > 1 first re-initialises the reset hypothesis (rng [seed, task, 7, g]).
    A finished generation's weights go to f'{name}_gen{g}.npz' in run.path (with '/' -> '_')
    and its results to state.json (run.finish), so a resumed run reloads them and skips it.
    After each generation, the dense and the slim network are evaluated on the task's test split.
    returns {'generations': [{'gen', 'dense_test_acc', 'dense_test_loss', 'slim_test_acc',
             'slim_test_loss', 'train_acc_last', 'wall_s'}], 'test_acc', 'test_loss' (last dense),
             'slim_test_acc', 'slim_test_loss' (last slim), 'train_acc_last', 'trainable',
             'slim_params', 'mode', 'split_rate', 'wall_s', 'curve' (all generations' curves, with
             'gen' and 'total_step' columns)}
    """
    if generations < 1:
        raise ValueError(f"generations must be >= 1, got {generations}")
    weights = {k: to_device(v, xp) for k, v in
               S.init_classifier(cfg, np.random.default_rng([seed, task, 7])).items()}
    masks = make_masks(cfg, mode, split_rate, np.random.default_rng([seed, task, 5]))
    ev, lg, ck = T.intervals(SimpleNamespace(eval_every=eval_every, log_every=log_every,
                                             ckpt_every=ckpt_every), steps_per_gen)
    sampler = T.task_sampler(taskset, [task], 1, batch, xp)

    def test(w):
        return T.evaluate(T.baseline_logits_fn(w, cfg), taskset, task, 'test', xp)

    def eval_fn(w):
        return dict(zip(('test_loss', 'test_acc'), test(w)))

    gens, curve = [], []
    for g in range(1, generations + 1):
        stage, path = f'{name}/gen{g}', _gen_path(run, name, g)
        again = f"generation {g} is then trained again from " + (f"generation {g - 1}'s weights" if g > 1 else 'its initial weights')
        if run.done(stage) and not os.path.exists(path):
            run.log(f"[{stage}] {path} is missing: {again}")
            del run.state['stages'][stage]
        if run.done(stage):
            weights = T.load_finished(path, again, cfg=cfg, params_like=weights, xp=xp)[0]
            res = run.state['stages'][stage]
            run.log(f"[{stage}] done already: loaded {path}")
        else:
            if g > 1:
                reinit_reset(weights, masks, np.random.default_rng([seed, task, 7, g]), cfg)
            t0 = time.perf_counter()
            gen_curve = T.train_stage(run, stage, weights, cfg, T.baseline_step(cfg), sampler, steps_per_gen,
                                      Optimizer(optimizer, learning_rate=lr), keys=None, seed=seed,
                                      eval_fn=eval_fn, eval_every=ev, log_every=lg, ckpt_every=ck)
            dense_loss, dense_acc = test(weights)
            slim_loss, slim_acc = test(slim(weights, masks))
            res = {'gen': g, 'dense_test_acc': dense_acc, 'dense_test_loss': dense_loss,
                   'slim_test_acc': slim_acc, 'slim_test_loss': slim_loss,
                   'train_acc_last': gen_curve[-1]['train_acc'], 'wall_s': time.perf_counter() - t0,
                   'curve': gen_curve}
            S.save_checkpoint(path, weights, cfg)                 # before finish: never done without it
            run.finish(stage, res)
            run.log(f"[{stage}] dense test acc {dense_acc:.4f}, slim ({mode}, s={split_rate}) {slim_acc:.4f}")
        gens.append({k: v for k, v in res.items() if k != 'curve'})
        curve += [{**row, 'gen': g, 'total_step': (g - 1) * steps_per_gen + row['step']} for row in res['curve']]
    last = gens[-1]
    return {'generations': gens, 'test_acc': last['dense_test_acc'], 'test_loss': last['dense_test_loss'],
            'slim_test_acc': last['slim_test_acc'], 'slim_test_loss': last['slim_test_loss'],
            'train_acc_last': last['train_acc_last'], 'trainable': S.count_params(cfg)['classifier'],
            'slim_params': count_fit(masks), 'mode': mode, 'split_rate': split_rate,
            'wall_s': sum(r['wall_s'] for r in gens), 'curve': curve}
