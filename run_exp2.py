#!/usr/bin/env python3
"""Experiment 2: does the generated network really depend on z?

100 tasks: task i (i < 50) = class i (label 0) vs class i+50 (label 1); task 50+i is the
same pair with the labels reversed (its "twin"). No single classifier can solve a task
and its twin (on the same images it must give opposite answers), so the generator
must read the task from z.
Phase 1: train generator + one z per task (one-hot start) on all tasks except one
         held-out twin pair (default pair 49: tasks 49 and 99).
Measured on the CIFAR-100 TEST split:
    convergence   train and test accuracy per task, averaged over the normal and
                  the reversed halves
    z swap        each task evaluated with its TWIN's z: if the network relies on z,
                  accuracy collapses toward 1 - accuracy
    z = 0         one classifier for both twins: the mean over a twin pair is exactly 0.5
    held-out twins  z-only adaptation (generator frozen) of tasks 49 and 99 separately:
                  can a learned z represent a task AND its reversal?
                  (with the whole network trained from scratch as the reference)

Results in --out: summary.json, results.md, phase1_curve.csv, per_task.csv,
adapt_curves.csv, plots (with matplotlib), log.txt, phase1.npz.
"""
import argparse
import os
import sys

import numpy as np

import data as D
import train as T

N_PAIRS = 50


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    T.add_common_args(p, default_out='runs/exp2')
    g = p.add_argument_group('experiment 2')
    g.add_argument('--holdout-pair', type=int, default=49,
                   help='twin pair held out of phase 1 (tasks i and 50+i; default 49); -1 holds out none')
    T.add_adapt_args(g, methods='z_only,whole_network')
    g.add_argument('--eval-tasks', type=int, default=10, help='tasks evaluated during phase 1 (default 10)')
    return p


QUICK = dict(synthetic_train=60, synthetic_test=20, steps=600, adapt_steps=150, lr=1e-3)


def twin(t):
    return (t + N_PAIRS) % (2 * N_PAIRS)


def z_swap(params, cfg, taskset, train_ids, rows, xp):
    """Per trained task (whose twin is trained too): test acc with its own z, its twin's z, z = 0."""
    out = {}
    zero = xp.zeros(cfg.z_dim, dtype=params['z'].dtype)
    for t in train_ids:
        if twin(t) not in rows:
            continue
        own = T.evaluate(T.supernet_logits_fn(params, cfg, params['z'][rows[t]]), taskset, t, 'test', xp)
        swap = T.evaluate(T.supernet_logits_fn(params, cfg, params['z'][rows[twin(t)]]), taskset, t, 'test', xp)
        z0 = T.evaluate(T.supernet_logits_fn(params, cfg, zero), taskset, t, 'test', xp)
        out[t] = {'own_acc': own[1], 'twin_z_acc': swap[1], 'z0_acc': z0[1]}
    return out


def write_results(run, args, counts, p1, swap, adapt_results, wall, fingerprints):
    per = p1['per_task']
    halves = {'normal (i vs i+50)': [t for t in map(int, per) if t < N_PAIRS],
              'reversed (i+50 vs i)': [t for t in map(int, per) if t >= N_PAIRS]}
    src = args.data_label
    lines = [f"# Experiment 2 ({src}, seed {args.seed})", '',
             f"Phase 1: {p1['steps']} steps x batch {args.batch} x {args.tasks_per_step} task(s) on "
             f"{len(per)} tasks, wall {p1['wall_s']:.0f} s.", '',
             '| tasks | n | train acc | test acc | test acc, twin\'s z | test acc, z = 0 |', '|---|---|---|---|---|---|']
    table = {}
    for name, ts in list(halves.items()) + [('all', [t for t in map(int, per)])]:
        tr = np.mean([per[str(t)]['train'][1] for t in ts])
        te = np.mean([per[str(t)]['test'][1] for t in ts])
        sw = [swap[t]['twin_z_acc'] for t in ts if t in swap]
        z0 = [swap[t]['z0_acc'] for t in ts if t in swap]
        table[name] = {'n': len(ts), 'train_acc': float(tr), 'test_acc': float(te),
                       'twin_z_acc': float(np.mean(sw)) if sw else None, 'z0_acc': float(np.mean(z0)) if z0 else None}
        lines.append(f"| {name} | {len(ts)} | {tr:.3f} | {te:.3f} | "
                     f"{np.mean(sw):.3f} | {np.mean(z0):.3f} |")
    if adapt_results:
        lines += ['', f"Held-out twin pair {args.holdout_pair}: {args.adapt_steps} steps per method; "
                      "test accuracy (test loss):", '',
                  '| method | trainable params | ' + ' | '.join(f'task {h}' for h in adapt_results) + ' |',
                  '|---|---|' + '---|' * len(adapt_results)]
        names = {'control_z0': 'control: z = 0', 'control_zmean': 'control: z = mean of learned z',
                 'control_zother': "control: another task's learned z (mean over tasks)",
                 'control_znew': f'control: initial new z ({args.new_z})', 'z_only': 'z only, generator frozen',
                 'whole_network': 'whole network from scratch', 'finetune': 'fine-tune generator + z',
                 **T.ke_labels(args)}
        T.add_ke_slim(adapt_results)
        for m in names:
            vals = [adapt_results[h].get(m) for h in adapt_results]
            if any(v is None for v in vals):
                continue
            lines.append(f"| {names[m]} | {vals[0]['trainable']:,} | " +
                         ' | '.join(f"{v['test_acc']:.3f} ({v['test_loss']:.3f})" for v in vals) + ' |')
    lines += ['', f"Total wall time {wall:.0f} s (summed over the commands that ran it, resumes included), "
                  f"peak memory {T.peak_rss_mb():.0f} MB (RSS)."]
    with open(os.path.join(run.path, 'results.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    run.write_csv('phase1_curve.csv', p1['curve'])
    tasks = D.exp2_tasks()
    run.write_csv('per_task.csv', [{'task': int(t), 'class0': tasks[int(t)].class0, 'class1': tasks[int(t)].class1,
                                    'train_acc': v['train'][1], 'test_acc': v['test'][1],
                                    **swap.get(int(t), {})} for t, v in per.items()])
    run.write_csv('adapt_curves.csv', [{'task': h, 'method': m, **row} for h, res in adapt_results.items()
                                       for m, r in res.items() for row in r.get('curve', [])])
    plotted = T.plot_curves(os.path.join(run.path, 'phase1.png'), 'Experiment 2, phase 1 (test acc, watched tasks)',
                            {'phase 1': p1['curve']})
    for h, res in adapt_results.items():
        T.plot_curves(os.path.join(run.path, f'adapt_task{h}.png'), f'Experiment 2, held-out task {h}',
                      {m: r['curve'] for m, r in res.items() if 'curve' in r})
    summary = {'experiment': 2, 'config': vars(args), 'param_counts': counts, 'fingerprints': fingerprints,
               'phase1': {k: v for k, v in p1.items() if k != 'curve'}, 'table': table,
               'z_swap': {str(t): v for t, v in swap.items()},
               'adapt': {str(h): {m: {k: v for k, v in r.items() if k != 'curve'} for m, r in res.items()}
                         for h, res in adapt_results.items()}, 'wall_s': wall, 'plots': plotted,
               'peak_rss_mb': T.peak_rss_mb()}
    run.write_json('summary.json', summary)
    run.log('\n'.join(lines))
    if T.pyplot() is None:          # not `plotted`: that is also False when there was nothing to plot
        run.log('(plots skipped: matplotlib is not installed; pip install matplotlib or .[plot])')
    return summary


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = T.parse_args(build_parser(), QUICK, argv)

    def body():
        tasks = D.exp2_tasks()
        if not -1 <= args.holdout_pair < N_PAIRS:
            raise SystemExit(f"error: --holdout-pair must be in 0..{N_PAIRS - 1} (or -1), got {args.holdout_pair}")
        holdout = [] if args.holdout_pair < 0 else [args.holdout_pair, args.holdout_pair + N_PAIRS]
        train_ids = [t for t in range(len(tasks)) if t not in holdout]
        T.validate_args(args, len(train_ids), len(holdout))
        xp, run, ds, taskset = T.start_run(args, tasks)
        run.log(f"Experiment 2 on {args.data_label}, {len(train_ids)} training "
                f"tasks, held out {holdout or 'none'}, {T.device_label(args)}")
        cfg, counts, fp = T.setup_model(run, args, len(train_ids), ds)
        params, p1 = T.phase1(run, args, cfg, taskset, train_ids, xp)
        rows = {t: i for i, t in enumerate(train_ids)}
        swap = z_swap(params, cfg, taskset, train_ids, rows, xp)
        adapt_results = {h: T.adapt(run, args, cfg, taskset, params, h, j, len(train_ids), xp)
                         for j, h in enumerate(holdout)}
        write_results(run, args, counts, p1, swap, adapt_results, run.wall(), fp)
        return 0

    return T.main_guard(body)


if __name__ == '__main__':
    sys.exit(main())
