"""Training loops, evaluation and run bookkeeping shared by run_exp1.py and run_exp2.py.

A run is a sequence of named *stages* (phase 1, then each adaptation). Each stage is
resumable on its own: it checkpoints every `ckpt_every` steps and on Ctrl-C (params,
optimizer state, the sampler's RNG state, the curve so far), so `--resume` continues it
to exactly the result of an uninterrupted run. A finished stage's results are kept in
`state.json`, so a resumed run skips it. A NaN/inf loss stops the run with a clear
message and leaves the last good checkpoint in place.
"""
import csv
import json
import math
import os
import signal
import sys
import time

import numpy as np

import supernet as S
from nn.backend import get_xp, to_device, to_host
from nn.loss import sigmoid_cross_entropy
from nn.optim import Optimizer


class TrainingDiverged(RuntimeError):
    pass


class Interrupted(RuntimeError):
    pass


# =========================================================================== output

class RunDir:
    """The output directory: log, state.json (the run's settings and finished stages),
    checkpoints, CSVs, plots. settings: the options that change results (run_settings);
    on resume they must equal the stored ones."""

    def __init__(self, path, resume=False, quiet=False, settings=None):
        self.path, self.quiet = path, quiet
        self.t_open = time.perf_counter()
        self.state_path, self.ckpt_dir = os.path.join(path, 'state.json'), os.path.join(path, 'ckpt')
        self.state = {}
        if os.path.exists(path) and not os.path.isdir(path):
            raise SystemExit(f"error: --out {path} is a file, not a directory")
        try:
            os.makedirs(path, exist_ok=True)
            if resume and os.path.exists(self.state_path):
                with open(self.state_path) as f:
                    self.state = json.load(f)
                if not isinstance(self.state, dict):
                    raise ValueError('not a JSON object')
                for key in ('stages', 'settings'):
                    if not isinstance(self.state.get(key, {}), dict):
                        raise ValueError(f"its {key!r} is not a JSON object")
                if not all(isinstance(v, dict) for v in self.state.get('stages', {}).values()):
                    raise ValueError("a stage's record is not a JSON object")
            self.log_file = open(os.path.join(path, 'log.txt'), 'a')
        except OSError as e:
            raise SystemExit(f"error: --out {path}: cannot write there ({e.strerror or e})")
        except ValueError as e:
            raise SystemExit(f"error: {self.state_path} is corrupt ({e}): delete it and run the same command "
                             "with --resume to train its finished stages again, or start afresh with another --out")
        held = os.path.exists(self.state_path) or bool(os.path.isdir(self.ckpt_dir) and os.listdir(self.ckpt_dir))
        if held and not resume:
            raise SystemExit(f"error: {path} already holds a run (state.json or checkpoints). Use --resume to "
                             "continue it, or choose another --out.")
        w = self.state.get('wall_s')           # the commands before this one (a resume)
        self.wall_before = float(w) if isinstance(w, (int, float)) and not isinstance(w, bool) else 0.0
        old = self.state.get('settings')
        if settings is not None and old is not None:
            def now(k):        # 'unset': an option this script lacks (a run of the other experiment)
                return repr(settings[k]) if k in settings else 'unset'
            diffs = [f"--{k.replace('_', '-')} {v!r} (now {now(k)})" for k, v in old.items()
                     if k not in settings or settings[k] != v]
            if diffs:
                raise SystemExit(f"error: --resume: {path} was run with other settings: {', '.join(diffs)}; "
                                 "resume with the run's own options, or start a new run with another --out")
        self.unstored_settings = None
        if settings is not None and old is None:
            if held:        # stored once a stage finishes: only then has this resume been accepted
                self.log(f"note: {path} has no stored settings (a run from before they were stored, or its "
                         "state.json was deleted): this resume's options are not checked; they are stored "
                         "when its next stage finishes")
                self.unstored_settings = settings
            else:
                self.state['settings'] = settings   # written before the first stage (phase1)

    def log(self, msg):
        if not self.quiet:
            print(msg, flush=True)
        self.log_file.write(msg + '\n')
        self.log_file.flush()

    def wall(self):
        """Wall time of the run so far: this command's, plus that of the commands before it
        (an interrupted one's up to its interruption), as stored in state.json."""
        return self.wall_before + time.perf_counter() - self.t_open

    def save_state(self):
        """Write state.json (atomically), with the wall time so far."""
        self.state['wall_s'] = self.wall()
        self.write_json('state.json', self.state)

    def ckpt(self, name):
        return os.path.join(self.ckpt_dir, name.replace('/', '_') + '.npz')

    def done(self, stage):
        return stage in self.state.get('stages', {})

    def finish(self, stage, result):
        """Record a finished stage; only then is its checkpoint deleted, so an interruption
        anywhere before (the final evaluation included) loses nothing."""
        self.state.setdefault('stages', {})[stage] = result
        if self.unstored_settings is not None:
            self.state['settings'], self.unstored_settings = self.unstored_settings, None
        self.save_state()
        if os.path.exists(self.ckpt(stage)):
            os.remove(self.ckpt(stage))

    def write_json(self, name, obj):
        p = os.path.join(self.path, name)
        tmp = p + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=2, default=_json_default)
        os.replace(tmp, p)

    def write_csv(self, name, rows):
        if not rows:
            return
        keys = list(rows[0])
        for r in rows[1:]:
            keys += [k for k in r if k not in keys]
        with open(os.path.join(self.path, name), 'w', newline='') as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_curves(path, title, curves, key='test_acc', ylabel='test accuracy'):
    """curves {label: [rows]} -> PNG. Returns False (and writes nothing) without matplotlib
    or without a single point to plot (e.g. --methods none: no adaptation curves)."""
    series = {}
    for label, rows in curves.items():
        pts = [(r['step'], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            series[label] = pts
    plt = pyplot() if series else None
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in series.items():
        ax.plot(*zip(*pts), label=label, marker='.')
    ax.set_xlabel('step')
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# =========================================================================== evaluation

def evaluate(logits_fn, taskset, task, split, xp, batch_size=500):
    """Mean loss and accuracy of logits_fn(x (m,H,W,C) on device) -> (m,) over a task split."""
    tot_loss = tot_correct = n = 0.0
    for x, y in taskset.eval_batches(task, split=split, batch_size=batch_size):
        xd, yd = to_device(x, xp), to_device(y, xp)
        logits = logits_fn(xd)
        loss, _ = sigmoid_cross_entropy(logits, yd)
        tot_loss += float(loss) * len(y)
        tot_correct += float(((logits > 0) == (yd > 0.5)).sum())
        n += len(y)
    return tot_loss / n, tot_correct / n


def supernet_logits_fn(params, cfg, z):
    """Logits under the classifier generated from one task vector z (z_dim,)."""
    Z = z.reshape(1, -1)
    theta, _ = S.generator_forward(Z, params, cfg)
    weights = S.split_theta(theta, cfg)
    return lambda x: S.classifier_forward(x[None], weights, cfg)[0][0]


def baseline_logits_fn(weights, cfg):
    """Logits of the whole-network baseline's weights, for evaluate."""
    return lambda x: S.baseline_logits(weights, x, cfg)


# =========================================================================== training loop

class _SigintFlag:
    """Turns Ctrl-C into a flag checked between steps, so a checkpoint is never taken
    in the middle of an update."""

    def __init__(self):
        self.hit = False

    def __enter__(self):
        self.old = None
        try:
            self.old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:       # not the main thread
            pass
        return self

    def _handler(self, *_):
        if self.hit:             # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)


def train_stage(run, name, params, cfg, step_fn, sample_fn, steps, optimizer, keys, seed,
                eval_fn=None, eval_every=0, log_every=100, ckpt_every=1000):
    """Train one stage, resumable.

    step_fn(params, batch) -> (loss, grads, logits, labels): one forward/backward
    sample_fn(rng) -> batch (already on the device)
    keys: the trainable parameter keys (the optimizer sees only these)
    eval_fn(params) -> dict of held-out figures, evaluated at step 0, every eval_every
                       steps and at the end; rows go into the returned curve
    returns the curve: [{'step', 'train_loss', 'train_acc', 'images_per_s', 'elapsed_s'
                         (training time so far, summed over resumes), ...eval}]
    """
    rng = np.random.default_rng([seed, _stable_hash(name)])
    ckpt = run.ckpt(name)
    start, curve, resumed_window, elapsed0 = 0, [], None, 0.0
    xp = get_xp(*params.values())
    if os.path.exists(ckpt):
        saved, opt_state, meta = S.load_checkpoint(ckpt, cfg=cfg, params_like=params, xp=xp)
        mo = meta.get('optimizer') or {}
        if (mo.get('rule'), mo.get('hyper')) != (optimizer.rule, optimizer.hyper):
            raise S.CheckpointError(
                f"checkpoint {ckpt} was trained with optimizer {mo.get('rule')} {mo.get('hyper')}, this run asks "
                f"for {optimizer.rule} {optimizer.hyper}: resume with the same --optimizer and learning rates")
        for k in params:
            params[k][...] = saved[k]
        optimizer.load_state_arrays(opt_state, to_device=lambda a: to_device(a, xp))
        extra = meta['extra']
        rng.bit_generator.state = extra['rng']
        start, curve = extra['step'], extra['curve']
        resumed_window = extra.get('window')
        elapsed0 = extra.get('elapsed_s', 0.0)
        run.log(f"[{name}] resumed at step {start}/{steps}")

    # what to do after a divergence: a later stage need not train phase 1 again
    afresh = ("Start afresh with a lower learning rate (another --out" +
              (f", and --phase1-from {run.path} to reuse its finished phase 1)" if name != 'phase1' and
               run.done('phase1') else ")"))

    def save(step, window=None):
        """window: the running sums of the current log interval, when stopping between
        boundaries (kept exactly, so the resumed curve equals an uninterrupted one)."""
        bad = [k for k in (params if keys is None else keys) if not bool(xp.isfinite(params[k]).all())]
        if bad:             # a finite loss can still be followed by an update to inf/NaN
            raise TrainingDiverged(
                f"[{name}] {', '.join(bad)} became non-finite by step {step}: stopping without saving. The last "
                f"good checkpoint ({ckpt if os.path.exists(ckpt) else 'none yet'}) is kept. {afresh}.")
        extra = {'step': step, 'rng': rng.bit_generator.state, 'curve': curve,
                 'elapsed_s': elapsed0 + time.perf_counter() - t0}
        if window is not None:
            extra['window'] = [_exact(window[0]), _exact(window[1])] + list(window[2:])
        S.save_checkpoint(ckpt, params, cfg, optimizer, extra=extra)

    def record(step, tr_loss, tr_acc, ips):
        row = {'step': step, 'train_loss': tr_loss, 'train_acc': tr_acc, 'images_per_s': ips,
               'elapsed_s': elapsed0 + time.perf_counter() - t0}
        if eval_fn is not None and (step == 0 or step == steps or (eval_every and step % eval_every == 0)):
            row.update(eval_fn(params))
        curve.append(row)
        return row

    t0, t_last, n_img = time.perf_counter(), time.perf_counter(), 0
    if start == 0 and not curve:
        record(0, None, None, None)
    run_loss, run_correct, run_n, last_step = 0.0, 0.0, 0, start
    if resumed_window is not None:
        run_loss, run_correct = (_unexact(v, xp) for v in resumed_window[:2])
        run_n, n_img, last_step = resumed_window[2:]
    with _SigintFlag() as sig:
        for step in range(start + 1, steps + 1):
            batch = sample_fn(rng)
            loss, grads, logits, labels = step_fn(params, batch)
            run_loss = run_loss + loss                       # stays on the device
            run_correct = run_correct + ((logits > 0) == (labels > 0.5)).sum()
            run_n += 1
            n_img += labels.size
            optimizer.step(params, grads, keys=keys)
            boundary = (step % log_every == 0 or step == steps or (eval_every and step % eval_every == 0)
                        or step % ckpt_every == 0)
            if boundary:
                mean_loss = float(run_loss) / run_n          # the only host sync
                if not math.isfinite(mean_loss):
                    raise TrainingDiverged(
                        f"[{name}] loss became {mean_loss} between steps {last_step} and {step}: stopping. "
                        f"The last good checkpoint ({ckpt if os.path.exists(ckpt) else 'none yet'}) is "
                        f"kept. {afresh}; --resume would replay the same steps.")
                acc = float(run_correct) / (run_n * labels.size)
                now = time.perf_counter()
                ips = n_img / max(now - t_last, 1e-9)
                row = record(step, mean_loss, acc, ips)
                eta = (steps - step) / max(step - start, 1) * (now - t0)
                extra = ''.join(f" {k} {v:.4f}" for k, v in row.items()
                                if k.startswith(('test', 'val')) and isinstance(v, float))
                run.log(f"[{name}] step {step}/{steps} loss {mean_loss:.4f} acc {acc:.3f}{extra} "
                        f"{ips:.0f} img/s ETA {_fmt_time(eta)}")
                run_loss, run_correct, run_n, n_img, t_last, last_step = 0.0, 0.0, 0, 0, now, step
                if step % ckpt_every == 0 and step < steps:
                    save(step)
            if sig.hit:
                if run_n and not math.isfinite(float(run_loss)):
                    raise TrainingDiverged(f"[{name}] interrupted, but the loss is already non-finite: "
                                           "not saving; the last good checkpoint is kept.")
                save(step, (run_loss, run_correct, run_n, n_img, last_step))
                if os.path.exists(run.state_path):
                    run.save_state()                # the wall time up to here, for the resumed run's total
                raise Interrupted(f"[{name}] interrupted at step {step}; checkpoint saved to {ckpt}. "
                                  "Run the same command with --resume to continue.")
    if start < steps:
        save(steps)          # the finished stage, kept until run.finish records its results
    return curve


def peak_rss_mb():
    """Peak resident memory so far, in MB: this process's plus its classifier worker
    processes' (nn/workers.py; approximate: their peaks need not coincide, and shared
    memory counts in both)."""
    import resource
    from nn import workers
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 + workers.peak_rss_mb()


def _exact(v):
    """A running sum (Python float or 0-d device array) as JSON, exactly."""
    if isinstance(v, float):
        return ['float', v]
    a = to_host(v)
    return [str(a.dtype), a.item()]


def _unexact(e, xp):
    dtype, v = e
    return v if dtype == 'float' else xp.asarray(np.array(v, dtype=dtype))


def _fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _stable_hash(s):
    h = 0
    for ch in s.encode():
        h = (h * 131 + ch) % (2 ** 31)
    return h


def make_optimizer(args, lr=None):
    name = args.optimizer
    hyper = {'learning_rate': args.lr if lr is None else lr}
    return Optimizer(name, **hyper)


# =========================================================================== steps

def supernet_step(cfg, rows, need_gen_grads=True):
    """step_fn for SuperNet training: batch = (x (G,m,H,W,C), y (G,m), task_ids (G,));
    rows maps dataset task ids to rows of params['z']."""
    def step(params, batch):
        x, y, tids = batch
        loss, grads, logits = S.loss_and_grads(params, x, y, [rows[t] for t in tids], cfg,
                                               need_gen_grads=need_gen_grads, lowrank=True)
        return loss, grads, logits, y
    return step


def baseline_step(cfg):
    def step(params, batch):
        x, y, _ = batch
        loss, grads, logits = S.baseline_loss_and_grads(params, x[0], y[0], cfg)
        return loss, grads, logits, y[0]
    return step


def task_sampler(taskset, task_ids, tasks_per_step, per_task, xp):
    """sample_fn: each step draws `tasks_per_step` distinct tasks (uniformly, from task_ids)
    and `per_task` training images of each, with replacement, as the original did."""
    task_ids = np.asarray(task_ids)

    def sample(rng):
        chosen = rng.choice(task_ids, size=tasks_per_step, replace=False)
        x, y, _ = taskset.sample_batch(rng, chosen.tolist(), per_task)
        G = len(chosen)
        x = to_device(x.reshape((G, per_task) + x.shape[1:]), xp)
        y = to_device(y.reshape(G, per_task), xp)
        return x, y, chosen.tolist()
    return sample


# =========================================================================== CLI helpers

def add_common_args(p, default_out):
    g = p.add_argument_group('data')
    g.add_argument('--data', choices=['synthetic', 'cifar100'], default='synthetic',
                   help="'cifar100' reads (or downloads) the real CIFAR-100 into --data-dir; "
                        "'synthetic' generates an offline stand-in in the same format (default)")
    g.add_argument('--data-dir', default=None, help='dataset cache (default $SUPERNET_DATA_DIR or ~/.cache/supernet)')
    g.add_argument('--synthetic-train', type=int, default=500, help='synthetic train images per class (500 = full size)')
    g.add_argument('--synthetic-test', type=int, default=100, help='synthetic test images per class')
    g = p.add_argument_group('model')
    g.add_argument('--z-dim', type=int, default=100)
    g.add_argument('--gen-hidden', type=str, default='', help="generator hidden widths, e.g. '256,256' (default none, as the original)")
    g.add_argument('--gen-output', choices=['tanh', 'linear'], default=None,
                   help="generator output: 'tanh' (default for the dense generator, bounds the weights) or "
                        "'linear' (default for --generator hyper, as Ha et al.)")
    g.add_argument('--gen-init', choices=['classifier', 'original'], default='classifier',
                   help="dense generator's init: 'classifier' (default: each generated tensor starts at its "
                        "Glorot scale for a one-hot z) or 'original' (the original code's TF defaults)")
    g.add_argument('--fc-activation', action='store_true', help='leaky ReLU between the fc layers (the original has none)')
    g.add_argument('--generator', choices=['dense', 'hyper'], default='dense',
                   help="'dense': SuperNet's generator (default); 'hyper': Ha et al.'s static hypernetwork "
                        "(16x16 kernel chunks, task-conditional chunk embeddings; see hyper.py)")
    g.add_argument('--hyper-nz', type=int, default=64, help='hypernetwork chunk-embedding size (default 64)')
    g.add_argument('--hyper-d', type=int, default=64, help='hypernetwork hidden size (default 64)')
    g = p.add_argument_group('training')
    g.add_argument('--steps', type=int, default=50000, help='phase-1 steps (default 50,000 = 20 epochs of 50,000 images at batch 20)')
    g.add_argument('--batch', type=int, default=20, help='images per task per step (default 20, the original)')
    g.add_argument('--tasks-per-step', type=int, default=1, help='tasks mixed in one step (default 1, the original)')
    g.add_argument('--optimizer', choices=['rmsprop', 'adam', 'momentum', 'sgd'], default='rmsprop')
    g.add_argument('--lr', type=float, default=1e-4, help='phase-1 learning rate (default 1e-4, the original RMSProp)')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--eval-every', type=int, default=0, help='held-out evaluation interval in steps (default 0: 10 points per stage)')
    g.add_argument('--log-every', type=int, default=0, help='progress line interval (default 0: 20 lines per stage)')
    g.add_argument('--ckpt-every', type=int, default=0,
                   help='checkpoint interval (default 0: 10 per stage); rounded to a multiple of the log interval')
    g = p.add_argument_group('run')
    g.add_argument('--device', choices=['cpu', 'gpu'], default='cpu')
    g.add_argument('--threads', type=int, default=0,
                   help='CPU threads, at most the usable CPUs (default 0: every usable CPU). supernet splits the '
                        'work itself and runs BLAS on one thread; results are reproducible for a given thread count')
    g.add_argument('--out', default=default_out, help=f'output directory (default {default_out})')
    g.add_argument('--resume', action='store_true',
                   help='continue the run in --out where it stopped. Its options must be the same (checked), except '
                        'those that change no result: --threads, --device (these two: float rounding only), '
                        '--ckpt-every, --quiet')
    g.add_argument('--quick', action='store_true', help='a first look in under half a minute on a 2-core CPU (small synthetic data, few steps)')
    g.add_argument('--quiet', action='store_true')


def intervals(args, steps):
    ev = args.eval_every or max(1, steps // 10)
    lg = args.log_every or max(1, steps // 20)
    ck = args.ckpt_every or max(lg, steps // 10)
    ck = max(lg, (ck // lg) * lg)          # checkpoints on log boundaries
    return ev, lg, ck


def model_config(args, n_tasks):
    hidden = tuple(int(v) for v in args.gen_hidden.split(',') if v.strip())
    out = args.gen_output or ('linear' if args.generator == 'hyper' else 'tanh')
    return S.Config(z_dim=args.z_dim, n_tasks=n_tasks, gen_hidden=hidden, gen_output=out,
                    gen_init=args.gen_init, fc_activation=args.fc_activation, generator=args.generator,
                    hyper_nz=args.hyper_nz, hyper_d=args.hyper_d)


def add_adapt_args(g, methods='z_only,whole_network,finetune'):
    g.add_argument('--phase1-from', default=None, metavar='DIR',
                   help='reuse the finished phase 1 of another run directory (same tasks, model, data, seed and '
                        'phase-1 options: only phase-2 options may differ) and run only the adaptation stages')
    g.add_argument('--new-z', choices=['onehot', 'zeros', 'mean'], default='onehot',
                   help="how a held-out task's z starts: an unused one-hot (default), zeros, or the "
                        "mean of the learned z vectors")
    g.add_argument('--adapt-steps', type=int, default=1000, help='phase-2 steps per method (default 1000)')
    g.add_argument('--z-lr', type=float, default=1e-2, help='z-only learning rate (default 1e-2)')
    g.add_argument('--baseline-lr', type=float, default=1e-3, help='whole-network learning rate (default 1e-3)')
    g.add_argument('--finetune-lr', type=float, default=None, help='generator fine-tuning learning rate (default: --lr)')
    g.add_argument('--methods', default=methods,
                   help="phase-2 methods to run (comma list of z_only, whole_network, finetune, ke; "
                        f"'none' = only the untrained controls; default {methods})")
    g.add_argument('--ke-generations', type=int, default=5,
                   help='Knowledge Evolution (method ke): generations of --adapt-steps each (default 5)')
    g.add_argument('--ke-split', type=float, default=0.5, help='Knowledge Evolution split rate s (default 0.5)')
    g.add_argument('--ke-mode', choices=['kels', 'wels'], default='kels',
                   help='Knowledge Evolution mask: kernel-level (default) or weight-level')


def phase1(run, args, cfg, taskset, train_ids, xp):
    """Train generator + z on train_ids; returns params (on device) and the phase summary."""
    rows = {t: i for i, t in enumerate(train_ids)}
    params = S.init_params(cfg, seed=args.seed, xp=xp)
    final = os.path.join(run.path, 'phase1.npz')
    again = "phase 1 and every stage after it are then redone"
    if run.done('phase1') and not os.path.exists(final):
        # the later stages started from the lost generator: a redone phase 1 (--threads may
        # differ on resume, and with it the rounding) must not be mixed with their results
        run.log(f"[phase1] {final} is missing: {again}")
        run.state['stages'] = {}
        for f in (os.listdir(run.ckpt_dir) if os.path.isdir(run.ckpt_dir) else []):
            os.remove(os.path.join(run.ckpt_dir, f))
    if not run.done('phase1') and getattr(args, 'phase1_from', None):
        _import_phase1(run, args.phase1_from, final, train_ids, cfg)     # refused: nothing written yet
    run.save_state()                                 # the settings, for --resume's check
    if run.done('phase1'):
        saved, _, _ = load_finished(final, again, cfg=cfg, params_like=params, xp=xp)
        run.log(f"[phase1] done already: loaded {final}")
        return saved, run.state['stages']['phase1']
    watch = train_ids[:: max(1, len(train_ids) // max(1, args.eval_tasks))][:args.eval_tasks]

    def eval_fn(p):
        res = [evaluate(supernet_logits_fn(p, cfg, p['z'][rows[t]]), taskset, t, 'test', xp) for t in watch]
        return {'test_loss': float(np.mean([r[0] for r in res])), 'test_acc': float(np.mean([r[1] for r in res]))}

    ev, lg, ck = intervals(args, args.steps)
    opt = make_optimizer(args)
    curve = train_stage(run, 'phase1', params, cfg, supernet_step(cfg, rows),
                          task_sampler(taskset, train_ids, args.tasks_per_step, args.batch, xp),
                          args.steps, opt, keys=None, seed=args.seed, eval_fn=eval_fn,
                          eval_every=ev, log_every=lg, ckpt_every=ck)
    wall = curve[-1]['elapsed_s']            # summed over interruptions and resumes
    run.log('[phase1] evaluating every training task ...')
    per_task = {}
    for t in train_ids:
        f = supernet_logits_fn(params, cfg, params['z'][rows[t]])
        per_task[t] = {'train': evaluate(f, taskset, t, 'train', xp), 'test': evaluate(f, taskset, t, 'test', xp)}
    summary = {
        'wall_s': wall, 'steps': args.steps, 'curve': curve,
        'train_acc_mean': float(np.mean([v['train'][1] for v in per_task.values()])),
        'test_acc_mean': float(np.mean([v['test'][1] for v in per_task.values()])),
        'test_acc_min': float(np.min([v['test'][1] for v in per_task.values()])),
        'test_loss_mean': float(np.mean([v['test'][0] for v in per_task.values()])),
        'per_task': {str(t): v for t, v in per_task.items()},
    }
    S.save_checkpoint(final, params, cfg)
    run.finish('phase1', summary)
    run.log(f"[phase1] {len(train_ids)} tasks: train acc {summary['train_acc_mean']:.3f}, "
            f"test acc {summary['test_acc_mean']:.3f} (min {summary['test_acc_min']:.3f}) in {wall:.0f} s")
    return params, summary


def load_finished(path, again, **kw):
    """S.load_checkpoint(path, **kw) of a finished stage's file. A damaged file is reported
    with advice that works: delete it and --resume, after which `again` happens (the stage
    is trained again); another model's file keeps load_checkpoint's own message."""
    try:
        return S.load_checkpoint(path, **kw)
    except S.CheckpointError as e:
        if e.__cause__ is None:                  # not a damaged file (e.g. another model): as it is
            raise
        raise S.CheckpointError(f"{path} is unreadable or corrupt ({e.__cause__}): delete it and run the "
                                f"same command with --resume; {again}") from None


def differing_options(a, b, may_differ=()):
    """Sorted keys of the options two runs both stored (an option one run's version lacked
    is not compared), other than may_differ, whose values differ."""
    return [k for k in sorted(set(a) & set(b)) if k not in may_differ and a[k] != b[k]]


# Options that only change phase 2 (or name the tasks, compared as the task list itself):
# --phase1-from may take a phase 1 whose run differs in these only.
PHASE2_ONLY = ('adapt_steps', 'methods', 'z_lr', 'baseline_lr', 'finetune_lr', 'new_z', 'ke_generations',
               'ke_mode', 'ke_split', 'phase1_from', 'holdout', 'holdout_pair', 'data_label')


def _import_phase1(run, src, final, train_ids, cfg):
    """Reuse the finished phase 1 of another run directory: same tasks, same model, and
    (where that run stored its options) the same data, seed and phase-1 options."""
    import shutil
    try:
        with open(os.path.join(src, 'state.json')) as f:
            state = json.load(f)
        p1 = state['stages']['phase1']
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"error: --phase1-from {src}: no finished phase 1 there ({e})")
    if sorted(int(t) for t in p1['per_task']) != sorted(train_ids):
        raise SystemExit(f"error: --phase1-from {src} was trained on other tasks; use the same --holdout")
    theirs, ours = state.get('settings'), run.state.get('settings')
    if isinstance(theirs, dict) and isinstance(ours, dict):
        diffs = [f"--{k.replace('_', '-')} {theirs[k]!r} there, {ours[k]!r} here"
                 for k in differing_options(theirs, ours, PHASE2_ONLY)]
        if diffs:
            raise SystemExit(f"error: --phase1-from {src}: its phase 1 ran with other options ({'; '.join(diffs)}); "
                             "use that run's data, seed and phase-1 options here")
    else:
        run.log(f"note: --phase1-from {src} has no stored options: only its tasks and model are checked")
    S.load_checkpoint(os.path.join(src, 'phase1.npz'), cfg=cfg)      # same model, or a clear error
    shutil.copyfile(os.path.join(src, 'phase1.npz'), final)
    run.finish('phase1', p1)
    run.log(f"[phase1] reusing the finished phase 1 of {src}")


def new_z(args, cfg, params, n_train, j, xp):
    """Initial z for the j-th held-out task."""
    if args.new_z == 'onehot':
        idx = n_train + j
        if idx >= cfg.z_dim:
            raise SystemExit(f"error: --new-z onehot needs an unused one-hot index, but {n_train} training "
                             f"tasks + {j + 1} held out > z_dim {cfg.z_dim}; use --new-z mean or zeros")
        z = xp.zeros(cfg.z_dim, dtype=params['z'].dtype)
        z[idx] = 1
        return z
    if args.new_z == 'zeros':
        return xp.zeros(cfg.z_dim, dtype=params['z'].dtype)
    return params['z'].mean(axis=0)


def adapt(run, args, cfg, taskset, params, h, j, n_train, xp):
    """Phase 2 on held-out task h; returns {method: result}."""
    results = {}
    gen = {k: v for k, v in params.items() if k != 'z'}
    ev, lg, ck = intervals(args, args.adapt_steps)
    sampler = task_sampler(taskset, [h], 1, args.batch, xp)
    z_mean = params['z'].mean(axis=0)
    for name, z in [('control_z0', xp.zeros_like(z_mean)), ('control_zmean', z_mean)]:
        loss, acc = evaluate(supernet_logits_fn(params, cfg, z), taskset, h, 'test', xp)
        results[name] = {'test_loss': loss, 'test_acc': acc, 'trainable': 0}
    # borrowing a trained task's network: every training task's z on the held-out task
    # (all Experiment-1 tasks share class 99 as label 1, so some transfer is expected)
    other = [evaluate(supernet_logits_fn(params, cfg, params['z'][r]), taskset, h, 'test', xp)
             for r in range(params['z'].shape[0])]
    results['control_zother'] = {'test_loss': float(np.mean([o[0] for o in other])),
                                 'test_acc': float(np.mean([o[1] for o in other])),
                                 'test_acc_best': float(np.max([o[1] for o in other])), 'trainable': 0}
    z0 = new_z(args, cfg, params, n_train, j, xp)
    loss, acc = evaluate(supernet_logits_fn(params, cfg, z0), taskset, h, 'test', xp)
    results['control_znew'] = {'test_loss': loss, 'test_acc': acc, 'trainable': 0}
    counts = S.count_params(cfg)
    for method in [m.strip() for m in args.methods.split(',') if m.strip() not in ('', 'none')]:
        stage = f'adapt/T{h}/{method}'
        if run.done(stage):
            results[method] = run.state['stages'][stage]
            continue
        ccfg = S.Config.from_dict({**cfg.to_dict(), 'n_tasks': 1})
        if method == 'z_only':
            p = dict(gen)                                   # the SAME generator arrays, frozen
            p['z'] = z0.reshape(1, -1).copy()
            step = supernet_step(ccfg, {h: 0}, need_gen_grads=False)
            keys, lr, trainable = ['z'], args.z_lr, cfg.z_dim

        elif method == 'finetune':
            p = {k: v.copy() for k, v in gen.items()}
            p['z'] = z0.reshape(1, -1).copy()
            step = supernet_step(ccfg, {h: 0})
            keys, lr = None, (args.finetune_lr or args.lr)
            trainable = counts['generator'] + cfg.z_dim

        elif method == 'ke':
            import knowledge_evolution as KE
            res = KE.run_knowledge_evolution(
                run, stage, cfg, taskset, h, xp, args.adapt_steps, generations=args.ke_generations,
                split_rate=args.ke_split, mode=args.ke_mode, lr=args.baseline_lr, optimizer=args.optimizer,
                seed=args.seed, eval_every=args.eval_every, log_every=args.log_every,
                ckpt_every=args.ckpt_every, batch=args.batch)
            run.finish(stage, res)
            results[method] = res
            continue
        elif method == 'whole_network':
            rng = np.random.default_rng([args.seed, h, 7])
            p = {k: to_device(v, xp) for k, v in S.init_classifier(cfg, rng).items()}
            step = baseline_step(cfg)
            keys, lr, trainable = None, args.baseline_lr, counts['classifier']
        else:
            raise SystemExit(f"error: unknown method {method!r} in --methods")

        def eval_fn(q, method=method):
            f = baseline_logits_fn(q, cfg) if method == 'whole_network' else supernet_logits_fn(q, ccfg, q['z'][0])
            return dict(zip(('test_loss', 'test_acc'), evaluate(f, taskset, h, 'test', xp)))

        before = {k: v.copy() for k, v in p.items() if k != 'z'} if method == 'z_only' else None
        opt = make_optimizer(args, lr=lr)
        curve = train_stage(run, stage, p, ccfg if method != 'whole_network' else cfg, step, sampler,
                              args.adapt_steps, opt, keys=keys, seed=args.seed * 1000 + h, eval_fn=eval_fn,
                              eval_every=ev, log_every=lg, ckpt_every=ck)
        res = {'test_loss': curve[-1]['test_loss'], 'test_acc': curve[-1]['test_acc'],
               'train_acc_last': curve[-1]['train_acc'], 'trainable': trainable,
               'wall_s': curve[-1]['elapsed_s'], 'curve': curve}
        if before is not None:      # the claims "frozen" and "z learned" are measured, not assumed:
            # the generator arrays this stage trained with, bit for bit, and how far z moved
            res['generator_unchanged'] = (set(before) == set(gen) and
                                          all(bool((before[k] == p[k]).all()) and p[k] is gen[k] for k in gen))
            res['z_change'] = float(xp.abs(p['z'][0] - z0).max())
            if not res['generator_unchanged']:
                raise RuntimeError('z-only adaptation changed the generator')
        run.finish(stage, res)
        results[method] = res
    return results


def parse_args(parser, quick, argv):
    """argparse with a --quick flag that changes the defaults only: given options still win."""
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**quick)
    return parser.parse_args(argv)


def device_label(args):
    """'device cpu, 2 CPU threads' / 'device gpu', for a run's first log line."""
    return f"device {args.device}" + (f", {args.threads} CPU threads" if args.device == 'cpu' else '')


# Options that change only how a run is carried out, not its results: they may differ between
# an interrupted run and its --resume (--threads and --device change the float rounding in the
# last bits only; checkpoints fall on log boundaries, so --ckpt-every changes no curve). Every
# other option must be the same (RunDir checks): --log-every and --eval-every too, as they set
# the curves' rows and the window of train_acc_last.
FREE_ON_RESUME = ('threads', 'device', 'ckpt_every', 'quiet', 'out', 'resume', 'quick', 'aggregate')


def run_settings(args):
    """The options that change a run's results, as stored in its state.json."""
    import data as D
    s = {k: v for k, v in vars(args).items() if k not in FREE_ON_RESUME}
    if s['data'] == 'synthetic':       # generated from its sizes alone; --data-dir is only its cache
        s['data_dir'] = None
    else:
        s['synthetic_train'] = s['synthetic_test'] = None
        s['data_dir'] = os.path.abspath(s['data_dir'] or D.default_data_dir())
    if s.get('phase1_from'):
        s['phase1_from'] = os.path.abspath(s['phase1_from'])
    s['gen_hidden'] = ','.join(v.strip() for v in s['gen_hidden'].split(',') if v.strip())   # '256, 256' = '256,256'
    return s


def start_run(args, tasks):
    """The device module, the output directory, and the dataset with a TaskSet of `tasks`
    (in that order: a missing GPU, a bad --out or a resume with other settings is reported
    before any data is read); labels the data. Call validate_args first."""
    import data as D
    from nn.backend import get_device_module, set_num_threads
    xp = get_device_module(args.device)
    run = RunDir(args.out, resume=args.resume, quiet=args.quiet, settings=run_settings(args))
    args.threads = set_num_threads(args.threads) if xp is np else 1
    ds = D.load_dataset(args.data, args.data_dir, n_train_per_class=args.synthetic_train,
                        n_test_per_class=args.synthetic_test, quiet=args.quiet)
    args.data_label = 'synthetic data' if ds.synthetic else 'CIFAR-100'
    return xp, run, ds, D.TaskSet(ds, tasks)


METHODS = ('z_only', 'whole_network', 'finetune', 'ke')


def validate_args(args, n_train, n_holdout):
    """Reject bad options before any data is read or training done (not after a 50,000-step phase 1)."""
    from nn.backend import threads_error

    def need(ok, msg):
        if not ok:
            raise SystemExit(f"error: {msg}")

    def opt(k):
        return '--' + k.replace('_', '-')
    for k in ('steps', 'batch', 'adapt_steps', 'z_dim', 'tasks_per_step', 'ke_generations', 'hyper_nz', 'hyper_d',
              'eval_tasks', 'synthetic_train', 'synthetic_test'):
        need(getattr(args, k) >= 1, f"{opt(k)} must be >= 1, got {getattr(args, k)}")
    for k, zero in (('eval_every', '10 evaluations per stage'), ('log_every', '20 progress lines per stage'),
                    ('ckpt_every', '10 checkpoints per stage')):
        need(getattr(args, k) >= 0, f"{opt(k)} must be >= 0 (0: {zero}), got {getattr(args, k)}")
    need(args.seed >= 0, f"--seed must be >= 0, got {args.seed}")
    bad_threads = threads_error(args.threads)
    need(bad_threads is None, bad_threads)
    for k in ('lr', 'z_lr', 'baseline_lr', 'finetune_lr'):
        v = getattr(args, k)
        need(v is None or 0 < v < math.inf, f"{opt(k)} must be a positive number, got {v}")
    try:
        widths = [int(v) for v in args.gen_hidden.split(',') if v.strip()]
    except ValueError:
        widths = [0]
    need(all(w >= 1 for w in widths),
         f"--gen-hidden must be comma-separated widths >= 1, e.g. '256,256' (or empty), got {args.gen_hidden!r}")
    need(args.tasks_per_step <= n_train, f"--tasks-per-step {args.tasks_per_step} exceeds the {n_train} training tasks")
    methods = [m.strip() for m in args.methods.split(',') if m.strip() not in ('', 'none')]
    bad = [m for m in methods if m not in METHODS]
    need(not bad, f"unknown --methods {bad}; choose from {', '.join(METHODS)} or 'none'")
    need(0 < args.ke_split <= 1, f"--ke-split must be in (0, 1], got {args.ke_split}")
    need(args.z_dim >= n_train, f"one-hot z needs --z-dim >= the {n_train} training tasks")
    if args.new_z == 'onehot' and n_holdout:
        need(n_train + n_holdout <= args.z_dim,
             f"--new-z onehot needs an unused one-hot index per held-out task: {n_train} + {n_holdout} > "
             f"--z-dim {args.z_dim}; use --new-z mean or zeros, or a larger --z-dim")
    if args.generator == 'hyper':
        need(not args.gen_hidden.strip(), "--gen-hidden applies to the dense generator only, not --generator hyper")
        need(args.gen_init == 'classifier',
             "--gen-init applies to the dense generator only, not --generator hyper (which has its own init)")


def ke_labels(args):
    """Results-table labels of Knowledge Evolution's rows (method ke; add_ke_slim adds ke_slim)."""
    return {'ke': f'Knowledge Evolution ({args.ke_mode}, {args.ke_generations} generations), dense',
            'ke_slim': f'Knowledge Evolution ({args.ke_mode}), slim (fit hypothesis only)'}


def add_ke_slim(adapt_results):
    """Each held-out task's slim Knowledge Evolution network as a method of its own, 'ke_slim'."""
    for res in adapt_results.values():
        if 'ke' in res:
            res['ke_slim'] = {'test_acc': res['ke']['slim_test_acc'], 'test_loss': res['ke']['slim_test_loss'],
                              'trainable': res['ke']['slim_params']}


def setup_model(run, args, n_train, ds):
    """The model config of a run, its parameter counts and fingerprints, both logged."""
    cfg = model_config(args, n_tasks=n_train)
    counts = S.count_params(cfg)
    run.log(f"parameters: classifier {counts['classifier']:,} (generated), generator "
            f"{counts['generator']:,}, z {counts['z_per_task']} per task x {cfg.n_tasks} tasks")
    fp = fingerprints(ds, cfg, args.seed)
    run.log('fingerprints (md5): ' + ', '.join(f'{k} {v}' for k, v in fp.items()))
    return cfg, counts, fp


def _md5(*arrays):
    import hashlib
    h = hashlib.md5(usedforsecurity=False)
    for a in arrays:
        h.update(np.ascontiguousarray(a).view(np.uint8).reshape(-1))
    return h.hexdigest()


def fingerprints(ds, cfg, seed):
    """md5s of what a run starts from: the images and labels of each split, and the initial
    parameters (float32, host) of `cfg` and `seed`. Equal fingerprints on two machines mean
    the same start; two runs that differ from step 0 on (results/host-dependence.txt) show
    which of the two differs."""
    p = S.init_params(cfg, seed=seed)
    return {'train_data': _md5(ds.train_x, ds.train_y), 'test_data': _md5(ds.test_x, ds.test_y),
            'init_params': _md5(*(p[k] for k in sorted(p)))}


def main_guard(fn):
    """Run fn(), turning our errors into one clear line and the right exit code."""
    from data import DataError
    try:
        return fn()
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted outside a training stage; finished stages and the last checkpoint are kept: "
              "run the same command with --resume to continue.", file=sys.stderr)
        return 130
    except (TrainingDiverged, S.CheckpointError, DataError, RuntimeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
