"""Learnable toy tasks shared by the generator tests (SuperNet and the hypernetwork)."""
import numpy as np


def toy_tasks(cfg, n_tasks, m, seed):
    """Label 1 brightens channel a and darkens channel b, label 0 the reverse, under unit
    noise (each task its own channel pair; task 3 is a new draw of task 1's rule, the kind
    of 'similar task' z-only adaptation is for).
    returns x (n_tasks, m, *cfg.image_shape) float32, y (n_tasks, m) float32"""
    r = np.random.default_rng(seed)
    pairs = [(0, 1), (1, 0), (0, 2), (1, 0)][:n_tasks]
    x = r.normal(size=(n_tasks, m) + cfg.image_shape).astype(np.float32)
    y = (r.random((n_tasks, m)) > 0.5).astype(np.float32)
    for t, (a, b) in enumerate(pairs):
        s = 0.5 * (2 * y[t] - 1)[:, None, None]
        x[t, ..., a] += s
        x[t, ..., b] -= s
    return x, y
