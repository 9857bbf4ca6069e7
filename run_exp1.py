#!/usr/bin/env python3
"""Experiment 1: can a new task be solved by learning only its task vector z?

Tasks T_i = class i (label 0) vs class 99 (label 1), i = 0..98.
Phase 1: train the generator and one z per task (z starts one-hot) on every task
         except the held-out ones (default: T_98), tasks drawn at random each step.
Phase 2: for each held-out task, on its training images, starting from the same point:
    z_only        generator FROZEN (bit for bit), only a fresh z is learned (z_dim parameters)
    whole_network the classifier alone, its 37,165 weights trained from scratch
    finetune      the whole generator + a fresh z, starting from phase 1
    controls      no training on the task: z = 0; z = the mean of the learned z vectors;
                  another task's learned z (mean over the training tasks); the fresh z
                  as initialised (--new-z)
Everything is evaluated on the held-out task's TEST images (CIFAR-100 test split).

Results in --out: summary.json, results.md (tables), phase1_curve.csv,
adapt_curves.csv, adapt_T<i>.png (with matplotlib), log.txt, phase1.npz.
"""
import argparse
import os
import sys

import numpy as np

import data as D
import train as T


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    T.add_common_args(p, default_out='runs/exp1')
    g = p.add_argument_group('experiment 1')
    g.add_argument('--holdout', default='98', help="held-out task(s), e.g. '98' (default) or '94-98'")
    T.add_adapt_args(g)
    g.add_argument('--aggregate', nargs='+', metavar='RUN_DIR',
                   help='print mean +- std over finished runs (e.g. two seeds) and exit, training nothing')
    g.add_argument('--eval-tasks', type=int, default=10,
                   help='training tasks evaluated during phase 1 (all of them at the end; default 10)')
    return p


QUICK = dict(synthetic_train=60, synthetic_test=20, steps=600, adapt_steps=150, holdout='97-98', lr=1e-3)


def parse(argv):
    return T.parse_args(build_parser(), QUICK, argv)


def write_results(run, args, counts, phase1_summary, adapt_results, wall, fingerprints):
    methods = ['control_z0', 'control_zmean', 'control_zother', 'control_znew', 'z_only', 'whole_network',
               'finetune', 'ke', 'ke_slim']
    labels = {'control_z0': 'control: z = 0 (no training)',
              'control_zmean': 'control: z = mean of learned z (no training)',
              'control_zother': "control: another task's learned z (mean over the training tasks, no training)",
              'control_znew': f'control: initial new z ({args.new_z}, no training)',
              'z_only': 'z only, generator frozen', 'whole_network': 'whole network from scratch',
              'finetune': 'fine-tune generator + z', **T.ke_labels(args)}
    if args.generator == 'hyper':
        labels['z_only'] = "z only, Ha et al.'s hypernetwork frozen"
        labels['finetune'] = 'fine-tune hypernetwork + z'
    lines = [f"# Experiment 1 ({args.data_label}, seed {args.seed})", '',
             f"Phase 1: {phase1_summary['steps']} steps x batch {args.batch} x {args.tasks_per_step} task(s), "
             f"{len(phase1_summary['per_task'])} tasks: train acc {phase1_summary['train_acc_mean']:.3f}, "
             f"test acc {phase1_summary['test_acc_mean']:.3f} (wall {phase1_summary['wall_s']:.0f} s).", '',
             f"Phase 2: {args.adapt_steps} steps per method, held-out task(s) {args.holdout}; test accuracy (test loss):", '',
             '| method | trainable params | ' + ' | '.join(f'T{h}' for h in adapt_results) + ' | mean |',
             '|---|---|' + '---|' * (len(adapt_results) + 1)]
    table = {}
    T.add_ke_slim(adapt_results)
    for m in methods:
        vals = [adapt_results[h].get(m) for h in adapt_results]
        if any(v is None for v in vals):
            continue
        accs = [v['test_acc'] for v in vals]
        table[m] = {'test_acc': accs, 'test_loss': [v['test_loss'] for v in vals],
                    'mean_acc': float(np.mean(accs)), 'trainable': vals[0]['trainable']}
        cells = ' | '.join(f"{v['test_acc']:.3f} ({v['test_loss']:.3f})" for v in vals)
        lines.append(f"| {labels[m]} | {vals[0]['trainable']:,} | {cells} | {np.mean(accs):.3f} |")
    lines += ['', f"Total wall time {wall:.0f} s (summed over the commands that ran it, resumes included), "
                  f"peak memory {T.peak_rss_mb():.0f} MB (RSS)."]
    with open(os.path.join(run.path, 'results.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    run.write_csv('phase1_curve.csv', phase1_summary['curve'])
    rows = []
    for h, res in adapt_results.items():
        for m, r in res.items():
            for row in r.get('curve', []):
                rows.append({'task': h, 'method': m, **row})
    run.write_csv('adapt_curves.csv', rows)
    plotted = T.plot_curves(os.path.join(run.path, 'phase1.png'), 'Experiment 1, phase 1 (test acc, watched tasks)',
                            {'phase 1': phase1_summary['curve']})
    for h, res in adapt_results.items():
        T.plot_curves(os.path.join(run.path, f'adapt_T{h}.png'), f'Experiment 1, held-out T{h}: test accuracy',
                      {labels[m]: r['curve'] for m, r in res.items() if 'curve' in r})
    summary = {'experiment': 1, 'config': vars(args), 'param_counts': counts, 'fingerprints': fingerprints,
               'phase1': {k: v for k, v in phase1_summary.items() if k != 'curve'},
               'adapt': {str(h): {m: {k: v for k, v in r.items() if k != 'curve'} for m, r in res.items()}
                         for h, res in adapt_results.items()},
               'table': table, 'wall_s': wall, 'plots': plotted, 'peak_rss_mb': T.peak_rss_mb()}
    run.write_json('summary.json', summary)
    run.log('\n'.join(lines))
    if T.pyplot() is None:          # not `plotted`: that is also False when there was nothing to plot
        run.log('(plots skipped: matplotlib is not installed; pip install matplotlib or .[plot])')
    return summary


# Options that may differ between the runs --aggregate pools: the seed (the spread is over
# it), how each run was carried out, and where its phase 1 came from.
_MAY_DIFFER = set(T.FREE_ON_RESUME) | {'seed', 'phase1_from', 'methods', 'data_label'}


def _check_comparable(runs):
    """Refuse runs that are not the same experiment with another seed: other options or
    other data (fingerprints; what a run's version did not store is not compared), or a
    seed given twice."""
    def options(r):             # --gen-output's default (None) as the value it stands for
        c = dict(r['config'])
        if 'gen_output' in c and c['gen_output'] is None:
            c['gen_output'] = 'linear' if c.get('generator') == 'hyper' else 'tanh'
        return c
    first = runs[0]
    for r in runs[1:]:
        a, b = options(first), options(r)
        may_differ = _MAY_DIFFER | ({'data_dir'} if a.get('data') == b.get('data') == 'synthetic' else set())
        diffs = [f"--{k.replace('_', '-')} {a[k]!r} / {b[k]!r}" for k in T.differing_options(a, b, may_differ)]
        fa, fb = first.get('fingerprints') or {}, r.get('fingerprints') or {}
        diffs += [f"{k} fingerprint {fa[k]} / {fb[k]}" for k in ('train_data', 'test_data')
                  if k in fa and k in fb and fa[k] != fb[k]]
        if diffs:
            raise SystemExit(f"error: --aggregate: {first['_dir']} and {r['_dir']} ran with other options "
                             f"({'; '.join(diffs)}): only runs that differ in --seed are pooled")
    seeds = [r['config']['seed'] for r in runs]
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise SystemExit(f"error: --aggregate: seed(s) {twice} given by more than one run; the spread is over "
                         "distinct seeds")


def aggregate(dirs):
    """Mean and spread over seeds of finished runs: per method, the test accuracy averaged
    over the held-out tasks of each run, then mean +- std (and min..max) over the runs."""
    import json
    runs, seen = [], set()
    for d in dirs:
        if os.path.realpath(d) in seen:
            print(f"note: {d} is given more than once; counted once", file=sys.stderr)
            continue
        seen.add(os.path.realpath(d))
        path = os.path.join(d, 'summary.json')
        try:
            with open(path) as f:
                r = json.load(f)
        except OSError as e:
            raise SystemExit(f"error: {d}: no finished run there ({e})")
        except ValueError as e:
            raise SystemExit(f"error: {path} is corrupt ({e})")
        exp = r.get('experiment') if isinstance(r, dict) else None
        if exp != 1:
            raise SystemExit(f"error: {path} is {f'an Experiment {exp} run' if exp else 'not a run summary'}; "
                             "--aggregate takes Experiment 1 runs")
        r['_dir'] = d
        runs.append(r)
    _check_comparable(runs)
    methods = []
    for r in runs:
        methods += [m for m in r['table'] if m not in methods]
    lines = [f"Experiment 1 over {len(runs)} runs (seeds {', '.join(str(r['config']['seed']) for r in runs)}; "
             f"held-out tasks {runs[0]['config']['holdout']}): test accuracy, mean over held-out tasks", '',
             '| method | trainable params | ' + ' | '.join(f"seed {r['config']['seed']}" for r in runs) +
             ' | mean +- std over seeds | per-task min..max |', '|---|---|' + '---|' * (len(runs) + 2)]
    for m in methods:
        per_run = [r['table'][m] for r in runs if m in r['table']]
        if len(per_run) != len(runs):
            continue
        means = [t['mean_acc'] for t in per_run]
        all_acc = [a for t in per_run for a in t['test_acc']]
        lines.append(f"| {m} | {per_run[0]['trainable']:,} | " + ' | '.join(f'{v:.3f}' for v in means) +
                     f" | {np.mean(means):.3f} +- {np.std(means):.3f} | {min(all_acc):.3f}..{max(all_acc):.3f} |")
    print('\n'.join(lines))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.aggregate:
        return T.main_guard(lambda: aggregate(args.aggregate))

    def body():
        tasks = D.exp1_tasks()
        try:
            holdout = D.parse_task_range(args.holdout, len(tasks))
        except D.TaskSpecError as e:
            raise SystemExit(f"error: --holdout: {e}")
        train_ids = [t for t in range(len(tasks)) if t not in holdout]
        T.validate_args(args, len(train_ids), len(holdout))
        xp, run, ds, taskset = T.start_run(args, tasks)
        run.log(f"Experiment 1 on {args.data_label} "
                f"({len(ds.train_y)} train / {len(ds.test_y)} test images), {T.device_label(args)}")
        cfg, counts, fp = T.setup_model(run, args, len(train_ids), ds)
        params, p1 = T.phase1(run, args, cfg, taskset, train_ids, xp)
        adapt_results = {}
        for j, h in enumerate(holdout):
            adapt_results[h] = T.adapt(run, args, cfg, taskset, params, h, j, len(train_ids), xp)
        write_results(run, args, counts, p1, adapt_results, run.wall(), fp)
        return 0

    return T.main_guard(body)


if __name__ == '__main__':
    sys.exit(main())
