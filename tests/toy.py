"""Batches shared by the generator tests (SuperNet and the hypernetwork): learnable toy
tasks, and random float64 batches for the gradient checks."""
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


def random_batch(cfg, G, m, seed):
    """Random images x (G, m, *cfg.image_shape) and 0/1 labels y (G, m), float64."""
    r = np.random.default_rng(seed)
    x = r.normal(size=(G, m) + cfg.image_shape)
    y = (r.random((G, m)) > 0.5).astype(np.float64)
    return x, y
