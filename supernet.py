"""SuperNet: a generating network that outputs every weight of a classifying network
from a small task vector z, with the whole backward written by hand.

Forward (for the G tasks present in a batch; Z holds their task vectors, one row each):

    h_0   = Z                                        (G, z_dim)
    h_l   = leaky_relu(h_{l-1} @ A_l + c_l)          optional hidden layers
    pre   = h_L @ W + b                              (G, P)   one matrix for ALL classifier tensors
    theta = tanh(pre)   (or theta = pre, 'linear')   (G, P)   P = 37,165 for the original classifier
    theta[g] is cut into the classifier's tensors (views): conv1.w (5,5,3,16), conv1.b (16,), ...
    logits[g] = classifier(x[g]; theta[g])           each task's images through its own weights
    loss = mean sigmoid_cross_entropy(logits, y)

Backward, the chain rule read right to left:

    dlogits            = (sigmoid(logits) - y) / N
    dtheta[g]          = classifier_backward(dlogits[g])   every layer multiplies its input by a
                                                            generated tensor, so dL/dtensor is the
                                                            layer's usual weight gradient
                                                            (e.g. dW_fc = h.T @ dout)
    dpre               = dtheta * (1 - theta**2)           through the tanh (dpre = dtheta if linear)
    dW                 = h_L.T @ dpre                       (dim_L, P)  one matrix product, rank G:
                                                            training passes it unformed (LowRank)
    db                 = sum_g dpre                         (P,)
    dh_L               = dpre @ W.T                         then back through the hidden layers
    dZ                 = dh_0;  dz[task_g] = dZ[g]          into the task vectors

Only the generator's parameters and the z vectors are trainable; the classifier has
no parameters of its own. `baseline_*` is the "change the whole network" comparison:
the same classifier with directly trainable weights.

Parameter dicts (keys):
    SuperNet:  'gen.h1.w', 'gen.h1.b', ... (hidden layers), 'gen.out.w' (dim_L, P),
               'gen.out.b' (P,), 'z' (n_tasks, z_dim)
    baseline:  'conv1.w', 'conv1.b', ..., 'fc1.w', ..., 'out.w', 'out.b'
Gradient dicts have the same keys.

On the CPU with several threads (nn.backend.set_num_threads) the classifier's batch is
cut into shards, one per thread (classifier_loss_and_grads, classifier_forward).
"""
import dataclasses
import json
import math
import os
import secrets
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from nn import layers as L
from nn.backend import (get_num_threads, get_shard_workers, get_xp, map_shards, parallel_map, split_range,
                        to_device, to_host)
from nn.loss import sigmoid_cross_entropy
from nn.optim import LowRank


# =========================================================================== config

class DictConfig:
    """to_dict / from_dict for a config dataclass (from_dict ignores unknown keys)."""

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Config(DictConfig):
    """Everything that determines the model's shapes and initialisation."""
    image_shape: tuple = (32, 32, 3)      # H, W, C (NHWC)
    conv_filters: tuple = (16, 16, 16, 16)
    kernel: int = 5
    stride: int = 2
    padding: str = 'SAME'
    fc: tuple = (100, 100)
    fc_activation: bool = False           # the original has none between the fc layers
    alpha: float = 0.2                    # leaky ReLU slope
    z_dim: int = 100
    n_tasks: int = 98
    gen_hidden: tuple = ()                # widths of the generator's hidden layers (leaky ReLU)
    gen_output: str = 'tanh'              # 'tanh' (bounds the weights) or 'linear'
    gen_init: str = 'classifier'          # 'classifier' or 'original' (see init_generator)
    z_init: str = 'onehot'                # 'onehot', 'zeros' or 'normal'
    generator: str = 'dense'              # 'dense' (SuperNet) or 'hyper' (Ha et al.'s static
    hyper_nz: int = 64                    #   hypernetwork, hyper.py): chunk embedding size,
    hyper_d: int = 64                     #   its hidden size,
    hyper_chunk: int = 16                 #   and the basic chunk (in = out filters)

    def __post_init__(self):
        for k in ('image_shape', 'conv_filters', 'fc', 'gen_hidden'):
            setattr(self, k, tuple(int(v) for v in getattr(self, k)))
        if self.gen_output not in ('tanh', 'linear'):
            raise ValueError(f"gen_output must be 'tanh' or 'linear', got {self.gen_output!r}")
        if self.gen_init not in ('classifier', 'original'):
            raise ValueError(f"gen_init must be 'classifier' or 'original', got {self.gen_init!r}")
        if self.z_init not in ('onehot', 'zeros', 'normal'):
            raise ValueError(f"z_init must be 'onehot', 'zeros' or 'normal', got {self.z_init!r}")
        if self.generator not in ('dense', 'hyper'):
            raise ValueError(f"generator must be 'dense' or 'hyper', got {self.generator!r}")
        if self.z_init == 'onehot' and self.n_tasks > self.z_dim:
            raise ValueError(f"one-hot z needs z_dim >= n_tasks ({self.z_dim} < {self.n_tasks})")



def classifier_shapes(cfg):
    """[(name, shape)] of every classifier tensor, in the generator's output order."""
    H, W, C = cfg.image_shape
    shapes, c = [], C
    for i, f in enumerate(cfg.conv_filters, 1):
        shapes += [(f'conv{i}.w', (cfg.kernel, cfg.kernel, c, f)), (f'conv{i}.b', (f,))]
        H = L.conv_output_size(H, cfg.kernel, cfg.stride, cfg.padding)[0]
        W = L.conv_output_size(W, cfg.kernel, cfg.stride, cfg.padding)[0]
        c = f
    d = H * W * c
    for j, f in enumerate(cfg.fc, 1):
        shapes += [(f'fc{j}.w', (d, f)), (f'fc{j}.b', (f,))]
        d = f
    shapes += [('out.w', (d, 1)), ('out.b', (1,))]
    return shapes


_LAYOUTS = {}        # the classifier's layouts by architecture: every step asks for one


def classifier_layout(cfg):
    """{name: (offset, size, shape)} of each tensor inside a generator output row (a
    read-only mapping, computed once per architecture), and P."""
    key = repr((cfg.image_shape, cfg.conv_filters, cfg.kernel, cfg.stride, cfg.padding, cfg.fc))
    if key not in _LAYOUTS:
        layout, off = {}, 0
        for name, shape in classifier_shapes(cfg):
            n = math.prod(shape)
            layout[name] = (off, n, shape)
            off += n
        _LAYOUTS[key] = (MappingProxyType(layout), off)
    return _LAYOUTS[key]


def _gen_dims(cfg):
    return [cfg.z_dim, *cfg.gen_hidden]


def generator_shapes(cfg):
    """{parameter key: shape} of the generator (without 'z'), from the config alone."""
    if cfg.generator == 'hyper':
        import hyper
        return hyper.hyper_shapes(cfg, hyper_config(cfg))
    _, P = classifier_layout(cfg)
    dims = _gen_dims(cfg)
    shapes = {}
    for l, (a, b) in enumerate(zip(dims[:-1], dims[1:]), 1):
        shapes[f'gen.h{l}.w'], shapes[f'gen.h{l}.b'] = (a, b), (b,)
    shapes['gen.out.w'], shapes['gen.out.b'] = (dims[-1], P), (P,)
    return shapes


def check_params(params, cfg):
    """Raise ValueError naming each difference unless params (generator keys, and 'z' if
    present) have exactly the shapes cfg's model has. Shapes only: no data is read."""
    want = generator_shapes(cfg)
    got = {k: tuple(v.shape) for k, v in params.items() if k.startswith('gen.')}
    diffs = [f"{k}: {'missing' if k not in got else f'shape {got[k]}, the model has {want[k]}'}"
             for k in want if got.get(k) != tuple(want[k])]
    diffs += [f"{k}: not a parameter of this model" for k in got if k not in want]
    if 'z' in params and (params['z'].ndim != 2 or params['z'].shape[1] != cfg.z_dim):
        diffs.append(f"z: shape {tuple(params['z'].shape)}, the model needs (n_tasks, {cfg.z_dim})")
    if diffs:
        raise ValueError("parameters do not fit the model config: " + '; '.join(diffs))


def count_params(cfg):
    """Parameter counts, computed from the shapes: classifier, generator, z."""
    return {'classifier': classifier_layout(cfg)[1],
            'generator': sum(math.prod(s) for s in generator_shapes(cfg).values()),
            'z_per_task': cfg.z_dim, 'z_total': cfg.z_dim * cfg.n_tasks}


# =========================================================================== init

def _glorot_limit(name, shape):
    """Glorot-uniform limit of a classifier tensor (as TF: conv fans include the kernel area)."""
    if len(shape) == 4:
        kh, kw, ci, co = shape
        return np.sqrt(6.0 / (kh * kw * ci + kh * kw * co))
    if len(shape) == 2:
        return np.sqrt(6.0 / (shape[0] + shape[1]))
    return 0.0                                           # biases start at zero


def init_classifier(cfg, rng, dtype=np.float32):
    """Directly trainable classifier weights (the whole-network baseline):
    Glorot-uniform weights, zero biases, as TF's defaults."""
    return {name: rng.uniform(-1, 1, size=shape).astype(dtype) * dtype(_glorot_limit(name, shape))
            for name, shape in classifier_shapes(cfg)}


def init_z(cfg, rng, n_tasks=None, dtype=np.float32, kind=None, first_index=0):
    """Task vectors (n_tasks, z_dim): one-hot e_(first_index + t), zeros or N(0, 1/z_dim)."""
    n = cfg.n_tasks if n_tasks is None else n_tasks
    kind = cfg.z_init if kind is None else kind
    if kind == 'onehot':
        if first_index + n > cfg.z_dim:
            raise ValueError(f"one-hot z: indices {first_index}..{first_index + n - 1} exceed z_dim {cfg.z_dim}")
        z = np.zeros((n, cfg.z_dim))
        z[np.arange(n), first_index + np.arange(n)] = 1.0
    elif kind == 'zeros':
        z = np.zeros((n, cfg.z_dim))
    elif kind == 'normal':
        z = rng.normal(0, 1 / np.sqrt(cfg.z_dim), size=(n, cfg.z_dim))
    else:
        raise ValueError(f"unknown z init {kind!r}")
    return z.astype(dtype)


def init_generator(cfg, rng, dtype=np.float32):
    """Generator parameters (host numpy).

    gen_init='classifier' (default): each head's columns of W are drawn Glorot-uniform for
    the classifier tensor they make, so that, for a one-hot z, the generated tensor has the
    distribution the classifier would get if it were trained directly: exactly with a
    linear output and no hidden layer (with hidden layers: the scale), and through tanh up
    to its curvature (tanh of the largest limit, 0.244 for out.w, is 2% under it); the
    biases within +-1e-3 of 0 (not exactly 0, so that their heads' columns are not zero). Every
    task then starts from a properly scaled, independent random classifier, the same
    starting point as the whole-network baseline.
    gen_init='original': the original code's TF defaults, Glorot-uniform over each dense
    head's own (z_dim, size) matrix (limit sqrt(6/(z_dim+size)), e.g. 0.068 for conv1.w,
    0.024 for fc2.w) with zero biases. This gives far too small fc weights (0.03 where
    Glorot for fc1 is 0.19), which is one reason the original trained slowly.
    Hidden layers (if any) are He-uniform; the output layer is then rescaled so the
    generated tensors still have the target scale for the initial one-hot z.
    """
    layout, P = classifier_layout(cfg)
    dims = _gen_dims(cfg)
    params = {}
    h = np.eye(cfg.z_dim)[:max(1, min(cfg.n_tasks, cfg.z_dim))]    # typical inputs: one-hot z
    for l, (a, b) in enumerate(zip(dims[:-1], dims[1:]), 1):
        lim = np.sqrt(6.0 / a)
        params[f'gen.h{l}.w'] = rng.uniform(-lim, lim, size=(a, b))
        params[f'gen.h{l}.b'] = np.zeros(b)
        pre = h @ params[f'gen.h{l}.w']
        h = np.maximum(pre, cfg.alpha * pre)
    d = dims[-1]
    W = np.empty((d, P))
    rms_h = np.sqrt(np.mean(h * h) * d) if cfg.gen_hidden else 1.0   # |h| for one-hot z is 1
    for name, (off, n, shape) in layout.items():
        if cfg.gen_init == 'original':
            lim = np.sqrt(6.0 / (cfg.z_dim + n))
        else:
            lim = _glorot_limit(name, shape)
            if lim == 0.0:
                lim = 1e-3            # bias heads: tiny, so dz also sees the bias path
        W[:, off:off + n] = rng.uniform(-lim, lim, size=(d, n)) / rms_h
    params['gen.out.w'] = W
    params['gen.out.b'] = np.zeros(P)
    return {k: v.astype(dtype) for k, v in params.items()}


def hyper_config(cfg):
    """The hyper.HyperConfig of a Config with generator='hyper' (output as cfg.gen_output)."""
    import hyper
    return hyper.HyperConfig(nz=cfg.hyper_nz, d=cfg.hyper_d, chunk=cfg.hyper_chunk, output=cfg.gen_output)


def init_params(cfg, seed=0, xp=np, dtype=np.float32):
    """Generator + z, created on the device of `xp` (the one place the device is chosen)."""
    if cfg.generator == 'hyper':
        import hyper
        return hyper.hyper_init_params(cfg, hyper_config(cfg), seed=seed, xp=xp, dtype=dtype)
    rng = np.random.default_rng(seed)
    params = init_generator(cfg, rng, dtype)
    params['z'] = init_z(cfg, rng, dtype=dtype)
    return {k: to_device(v, xp) for k, v in params.items()}


def generator_keys(params):
    return [k for k in params if k.startswith('gen.')]


# =========================================================================== generator

def generator_forward(Z, params, cfg):
    """Z (G, z_dim) -> theta (G, P): every classifier tensor for each of the G task vectors."""
    if cfg.generator == 'hyper':                 # Ha et al.'s hypernetwork, same contract
        import hyper
        theta, cache = hyper.hyper_forward(Z, params, cfg, hyper_config(cfg))
        return theta, ('hyper', cache)
    caches = []
    h = Z
    for l in range(1, len(cfg.gen_hidden) + 1):
        pre, c_d = L.dense_forward(h, params[f'gen.h{l}.w'], params[f'gen.h{l}.b'])
        h, c_a = L.leaky_relu_forward(pre, cfg.alpha)
        caches.append((c_d, c_a))
    theta, c_out = _out_layer_forward(h, params['gen.out.w'], params['gen.out.b'])
    c_tanh = None
    if cfg.gen_output == 'tanh':
        theta, c_tanh = L.tanh_forward(theta)
    return theta, (caches, c_out, c_tanh)


# The generator's big layer streams its 15 MB weight matrix. For a few task vectors that
# is bound by memory bandwidth, which a second thread does not add to (measured slower
# at G = 1); from this many task vectors on the products are worth splitting over the
# CPU threads by column blocks of W (measured 1.6x faster at G = 8 on 2 threads).
_GEN_THREADS_MIN_G = 4


def _gen_column_blocks(G, W, xp):
    """How the generator's big products h @ W and W @ dpre.T run on the CPU: a list, one
    entry per thread, of column blocks of W, each small enough for OpenBLAS's small-matrix
    kernels (nn.layers.small_product_slices; the products alone 0.83x / 0.73x the time of
    whole ones at G = 8, the step 0.96x at G = 2 and 4, unchanged at 8:
    results/gen-blocks.txt); or None, one whole product (G = 1, a matrix-vector product;
    a device; no columns)."""
    P = W.shape[1]
    if xp is not np or G < 2 or P == 0:
        return None
    n = get_num_threads() if G >= _GEN_THREADS_MIN_G else 1
    return [L.small_product_slices(xp, part.start, part.stop, W.shape[0], G)
            for part in split_range(P, max(1, n))]


def _out_layer_forward(h, W, b):
    """theta = h @ W + b for the generator's big layer, h (G, dim), W (dim, P)."""
    xp = get_xp(h, W, b)
    blocks = _gen_column_blocks(h.shape[0], W, xp)
    if blocks is None:
        return L.dense_forward(h, W, b)
    theta = xp.empty((h.shape[0], W.shape[1]), dtype=h.dtype)

    def run(cols):
        for c in cols:
            xp.matmul(h, W[:, c], out=theta[:, c])
            theta[:, c] += b[c]
    parallel_map(run, blocks)
    return theta, (h, W)


def _out_layer_backward(dpre, h, W, need_dW, lowrank=False):
    """The generator's big dense layer backward: dh = dpre @ W.T and dW = h.T @ dpre
    (None unless need_dW; with lowrank, the unformed product LowRank(h.T, dpre)).
    dh is computed as (W @ dpre.T).T: the same product, which OpenBLAS runs 1.5-1.8x faster
    for G >= 2 task vectors (2.05 -> 1.21 ms at G = 8; equal at G = 1; results/gen-dh.txt),
    as the sum over column blocks c of W[:, c] @ dpre[:, c].T (_gen_column_blocks)."""
    xp = get_xp(dpre, h, W)
    dW = None
    if need_dW:
        # xp.dot: numpy's matmul is 8x slower for the rank-1 (G = 1) outer product
        dW = LowRank(h.T, dpre) if lowrank else xp.dot(h.T, dpre)
    blocks = _gen_column_blocks(dpre.shape[0], W, xp)
    if blocks is None:
        return xp.ascontiguousarray((W @ dpre.T).T), dW

    def run(cols):
        acc = W[:, cols[0]] @ dpre[:, cols[0]].T
        for c in cols[1:]:
            acc += W[:, c] @ dpre[:, c].T
        return acc
    parts = parallel_map(run, blocks)
    dhT = parts[0]
    for p in parts[1:]:
        dhT += p
    return xp.ascontiguousarray(dhT.T), dW


def generator_backward(dtheta, cache, need_param_grads=True, lowrank=False):
    """dtheta (G, P) -> (dZ (G, z_dim), {generator key: grad}).

    need_param_grads=False (z-only training, generator frozen) skips dW and db, the
    generator's largest products, and returns only dZ.
    lowrank=True returns the output layer's weight gradient h.T @ dpre unformed, as
    nn.optim.LowRank (rank G); the optimizers apply it chunk by chunk (see LowRank).
    """
    if cache[0] == 'hyper':
        import hyper
        return hyper.hyper_backward(dtheta, cache[1], need_param_grads)
    caches, (h, W), c_tanh = cache
    dpre = L.tanh_backward(dtheta, c_tanh) if c_tanh is not None else dtheta
    grads = {}
    dh, dW = _out_layer_backward(dpre, h, W, need_param_grads, lowrank)
    if need_param_grads:
        grads['gen.out.w'], grads['gen.out.b'] = dW, dpre.sum(axis=0)
    for l in range(len(caches), 0, -1):
        c_d, c_a = caches[l - 1]
        dpre_l = L.leaky_relu_backward(dh, c_a)
        dh, dw, db = L.dense_backward(dpre_l, c_d)
        if need_param_grads:
            grads[f'gen.h{l}.w'], grads[f'gen.h{l}.b'] = dw, db
    return dh, grads


def split_theta(theta, cfg):
    """theta (G, P) -> {name: (G, *shape)} views, one generated tensor per classifier tensor."""
    layout, P = classifier_layout(cfg)
    if theta.shape[-1] != P:
        raise ValueError(f"generator output has {theta.shape[-1]} values, the classifier needs {P}")
    G = theta.shape[0]
    return {name: theta[:, off:off + n].reshape((G,) + shape) for name, (off, n, shape) in layout.items()}


def merge_theta(dweights, cfg, xp, dtype):
    """{name: (G, *shape)} -> (G, P), the inverse of split_theta (for the gradients)."""
    layout, P = classifier_layout(cfg)
    G = next(iter(dweights.values())).shape[0]
    out = xp.empty((G, P), dtype=dtype)
    for name, (off, n, _) in layout.items():
        out[:, off:off + n] = dweights[name].reshape(G, n)
    return out


# =========================================================================== classifier

def _shards(G, m, xp, kind='threads'):
    """How the classifier splits a (G, m) batch over the CPU threads: ('G', slices) (whole
    task groups per thread, when they divide evenly: no weight gradients to sum, bigger
    products; measured 2-3% faster than image shards for 8x64), ('m', slices) (image shards
    of every group, the one-task case), or None (one thread, a device array, or a batch
    too small to be worth it). kind: what runs the shards, 'threads' or 'processes'
    (_MIN_SHARD)."""
    n = get_num_threads() if xp is np else 1
    min_shard = _MIN_SHARD[kind]
    if n < 2 or G * m < 2 * min_shard:
        return None
    if G % n == 0:
        return 'G', split_range(G, n)
    if m >= 2 * n:
        return 'm', split_range(m, min(n, m // min_shard) if G == 1 else n)
    if G >= n:
        return 'G', split_range(G, n)
    return None


# Images: below this a shard's overhead outweighs the second core. Threads: 16 (GIL
# hand-overs); worker processes: 8 (batch 20 as two shards of 10: the step 0.95-0.97x the
# time of one shard; shards of 4-6 images were 1.04-1.12x slower; results/min-shard.txt).
_MIN_SHARD = {'processes': 8, 'threads': 16}


def classifier_forward(x, weights, cfg):
    """x (G, m, H, W, C), weights {name: (G, *shape)} -> logits (G, m), cache.

    conv 5x5/2 SAME + leaky ReLU (x4), flatten, fc (+ leaky ReLU if fc_activation), out.
    With several CPU threads (nn.backend.set_num_threads) the batch is cut into shards,
    one per thread, run side by side; classifier_backward sums (or, for group shards,
    joins) their weight gradients. Same maths; float rounding depends on the thread count.
    """
    _check_images(x, cfg)
    xp = get_xp(x, *weights.values())
    shards = _shards(x.shape[0], x.shape[1], xp)
    if shards is None:
        return _classifier_forward(x, weights, cfg)
    axis, slices = shards
    parts = parallel_map(lambda s: _classifier_forward(*_cut(axis, s, x), _cut_weights(axis, s, weights), cfg),
                         slices)
    logits = xp.concatenate([lg for lg, _ in parts], axis=_SHARD_AXIS[axis])
    return logits, ('shards', axis, slices, [c for _, c in parts])


_SHARD_AXIS = {'G': 0, 'm': 1}      # the axis of a (G, m, ...) array that a shard cuts


def _cut(axis, s, *arrays):
    """Shard s of each (G, m, ...) array: images [:, s] of every group, or groups [s]."""
    return [a[:, s] if axis == 'm' else a[s] for a in arrays]


def _cut_weights(axis, s, weights):
    """The weights of shard s: all of them for image shards, groups [s] for group shards."""
    return weights if axis == 'm' else {k: v[s] for k, v in weights.items()}


def _check_images(x, cfg):
    if x.ndim != 5 or tuple(x.shape[2:]) != tuple(cfg.image_shape):
        raise ValueError(f"classifier: input {tuple(x.shape)} should be (G, m, {', '.join(map(str, cfg.image_shape))})")


def _classifier_forward(x, weights, cfg):
    """classifier_forward on one thread."""
    caches = []
    h = x
    for i in range(1, len(cfg.conv_filters) + 1):
        h, c_conv = L.conv_forward(h, weights[f'conv{i}.w'], weights[f'conv{i}.b'], cfg.stride, cfg.padding)
        h, c_act = L.leaky_relu_forward(h, cfg.alpha)
        caches.append((c_conv, c_act))
    h, c_flat = L.flatten_forward(h, keep=2)
    fc_caches = []
    for j in range(1, len(cfg.fc) + 1):
        h, c_fc = L.dense_forward(h, weights[f'fc{j}.w'], weights[f'fc{j}.b'])
        c_act = None
        if cfg.fc_activation:
            h, c_act = L.leaky_relu_forward(h, cfg.alpha)
        fc_caches.append((c_fc, c_act))
    out, c_out = L.dense_forward(h, weights['out.w'], weights['out.b'])
    return out[..., 0], (caches, c_flat, fc_caches, c_out)


def classifier_backward(dlogits, cache, need_dx=False):
    """dlogits (G, m) -> {name: (G, *shape)} gradients of every classifier tensor
    (and dx (G, m, H, W, C) under key 'x' when need_dx)."""
    if cache[0] != 'shards':
        return _classifier_backward(dlogits, cache, need_dx)
    _, axis, slices, caches = cache
    parts = parallel_map(lambda sc: _classifier_backward(*_cut(axis, sc[0], dlogits), sc[1], need_dx),
                         list(zip(slices, caches)))
    return _merge_shard_grads(parts, axis, get_xp(dlogits))


def _merge_shard_grads(parts, axis, xp):
    """The shards' gradients as one dict: weights shared by image shards summed (in shard
    order), per-group tensors (group shards) and the input gradient 'x' joined."""
    g = {}
    for k in parts[0]:
        if axis == 'G' or k == 'x':
            g[k] = xp.concatenate([p[k] for p in parts], axis=_SHARD_AXIS[axis] if k == 'x' else 0)
        else:
            g[k] = parts[0][k]
            for p in parts[1:]:
                g[k] = g[k] + p[k]
    return g


def classifier_loss_and_grads(x, y, weights, cfg):
    """Forward, mean sigmoid cross-entropy and backward of the classifier in one call:
    x (G, m, H, W, C), y (G, m), weights {name: (G, *shape)} -> (loss, {name: grad}, logits).
    Same numbers as classifier_forward + sigmoid_cross_entropy + classifier_backward; on
    several CPU threads each shard does all three on its own, taking its share n_s/N of
    the mean (loss and dlogits scaled by it), so a step hands work to the threads once."""
    _check_images(x, cfg)
    if tuple(y.shape) != tuple(x.shape[:2]):
        raise ValueError(f"classifier: labels {tuple(y.shape)} do not match images {tuple(x.shape)}: "
                         f"expected y {tuple(x.shape[:2])}")
    xp = get_xp(x, *weights.values())
    shards = _shards(x.shape[0], x.shape[1], xp, get_shard_workers())

    if shards is None:
        return _shard_loss_and_grads(x, y, weights, 1.0, cfg)
    axis, slices = shards
    n = x.shape[_SHARD_AXIS[axis]]
    parts = map_shards(_shard_loss_and_grads, [(*_cut(axis, s, x, y), _cut_weights(axis, s, weights),
                                                (s.stop - s.start) / n, cfg) for s in slices])
    loss = parts[0][0]
    for p in parts[1:]:
        loss = loss + p[0]
    logits = xp.concatenate([p[2] for p in parts], axis=_SHARD_AXIS[axis])
    return loss, _merge_shard_grads([p[1] for p in parts], axis, xp), logits


def _shard_loss_and_grads(x, y, weights, frac, cfg):
    """classifier_loss_and_grads on one thread, for a shard holding the fraction `frac` of
    the batch: (frac * loss, grads of frac * loss, logits). Module level: a worker
    process runs it by name (nn.backend.map_shards)."""
    logits, cache = _classifier_forward(x, weights, cfg)
    loss, dlogits = sigmoid_cross_entropy(logits, y)
    if frac != 1.0:
        loss, dlogits = loss * frac, dlogits * frac
    return loss, _classifier_backward(dlogits, cache), logits


def _classifier_backward(dlogits, cache, need_dx=False):
    """classifier_backward on one thread."""
    caches, c_flat, fc_caches, c_out = cache
    g = {}
    dh, g['out.w'], g['out.b'] = L.dense_backward(dlogits[..., None], c_out)
    for j in range(len(fc_caches), 0, -1):
        c_fc, c_act = fc_caches[j - 1]
        if c_act is not None:
            dh = L.leaky_relu_backward(dh, c_act)
        dh, g[f'fc{j}.w'], g[f'fc{j}.b'] = L.dense_backward(dh, c_fc)
    dh = L.flatten_backward(dh, c_flat)
    for i in range(len(caches), 0, -1):
        c_conv, c_act = caches[i - 1]
        dh = L.leaky_relu_backward(dh, c_act)
        dh, g[f'conv{i}.w'], g[f'conv{i}.b'] = L.conv_backward(dh, c_conv, need_dx=(i > 1 or need_dx))
    if need_dx:
        g['x'] = dh
    return g


# =========================================================================== SuperNet

def group_batch(x, y, task):
    """A flat batch (x (N,H,W,C), y (N,), task (N,) ints on the host) -> grouped
    (x (G, m, H, W, C), y (G, m), tasks (G,)), samples sorted by task.
    Mixed-task batches need the same number of samples per task."""
    task = np.asarray(to_host(task)).astype(np.int64)
    if task.ndim != 1 or len(task) != x.shape[0] or y.shape != (x.shape[0],):
        raise ValueError(f"batch: x {tuple(x.shape)}, y {tuple(y.shape)}, task {task.shape} do not match")
    tasks, counts = np.unique(task, return_counts=True)
    if np.any(counts != counts[0]):
        raise ValueError(f"mixed-task batch needs equal samples per task, got counts {counts.tolist()}")
    G, m = len(tasks), int(counts[0])
    if np.all(task.reshape(G, m) == tasks[:, None]):       # already grouped: no copy
        return x.reshape((G, m) + x.shape[1:]), y.reshape(G, m), tasks
    order = np.argsort(task, kind='stable')
    idx = to_device(order, get_xp(x))
    return x[idx].reshape((G, m) + x.shape[1:]), y[idx].reshape(G, m), tasks


def forward_from_z(params, Z, x, cfg):
    """Logits of x (G, m, H, W, C) under the classifiers generated from Z (G, z_dim)."""
    theta, _ = generator_forward(Z, params, cfg)
    logits, _ = classifier_forward(x, split_theta(theta, cfg), cfg)
    return logits


def loss_and_grads(params, x, y, tasks, cfg, need_gen_grads=True, Z=None, lowrank=False):
    """One step's loss and every gradient, by hand.

    params: {'gen.*': ..., 'z': (n_tasks, z_dim)}
    x:      (G, m, H, W, C) images, group g from task tasks[g]
    y:      (G, m) 0/1 labels
    tasks:  (G,) distinct task ids (host ints), rows of params['z']
    need_gen_grads: False in z-only mode (skips the generator's weight gradients)
    Z:      optional (G, z_dim) task vectors to use instead of params['z'][tasks]
            (then no 'z' gradient is returned; 'Z' is, for the caller)
    lowrank: grads['gen.out.w'] as nn.optim.LowRank(h.T, dpre), the rank-G product never
            formed (training: the optimizer builds it chunk by chunk); else an array
    returns loss (0-d array), grads {key: array}, logits (G, m)
    """
    xp = get_xp(x, params['z'])
    check_params(params, cfg)
    raw = np.asarray(to_host(tasks)).reshape(-1)
    if raw.size and raw.dtype.kind not in 'iu':
        raise ValueError(f"loss_and_grads: task ids must be integers, got {raw.dtype} {raw.tolist()[:5]}")
    tasks = raw.astype(np.int64)
    if x.ndim != 5 or x.shape[0] != len(tasks) or y.shape != x.shape[:2]:
        raise ValueError(f"loss_and_grads: x {tuple(x.shape)}, y {tuple(y.shape)} and {len(tasks)} tasks "
                         "do not match: expected x (G, m, H, W, C), y (G, m), tasks (G,)")
    if len(np.unique(tasks)) != len(tasks):
        raise ValueError("loss_and_grads: tasks must be distinct (group the batch with group_batch)")
    use_table = Z is None
    if use_table and len(tasks) and not (0 <= tasks.min() and tasks.max() < params['z'].shape[0]):
        raise ValueError(f"loss_and_grads: task ids {tasks.tolist()} outside the {params['z'].shape[0]} "
                         f"rows of params['z'] (0..{params['z'].shape[0] - 1})")
    if use_table:
        Z = params['z'][to_device(tasks, xp)]                     # (G, z_dim)
    theta, g_cache = generator_forward(Z, params, cfg)           # (G, P)
    weights = split_theta(theta, cfg)
    loss, dweights, logits = classifier_loss_and_grads(x, y, weights, cfg)
    dtheta = merge_theta(dweights, cfg, xp, theta.dtype)
    dZ, grads = generator_backward(dtheta, g_cache, need_param_grads=need_gen_grads, lowrank=lowrank)
    if use_table:
        dz = xp.zeros_like(params['z'])
        dz[to_device(tasks, xp)] = dZ                             # tasks are distinct
        grads['z'] = dz
    else:
        grads['Z'] = dZ
    return loss, grads, logits


# =========================================================================== baseline

def baseline_loss_and_grads(weights, x, y, cfg):
    """The whole-network baseline: the same classifier, its weights trained directly.
    weights {name: shape}, x (m, H, W, C), y (m,) -> loss, {name: grad}, logits (m,)."""
    wg = {k: v[None] for k, v in weights.items()}
    loss, g, logits = classifier_loss_and_grads(x[None], y[None], wg, cfg)
    return loss, {k: v[0] for k, v in g.items()}, logits[0]


def baseline_logits(weights, x, cfg):
    return classifier_forward(x[None], {k: v[None] for k, v in weights.items()}, cfg)[0][0]


# =========================================================================== checkpoints

class CheckpointError(RuntimeError):
    pass


def save_checkpoint(path, params, cfg, optimizer=None, extra=None):
    """Params, optimizer state, config and `extra` (a JSON-able dict, e.g. step and RNG
    state) in one .npz, written atomically (temporary file in the same folder, then rename).
    The file gets the mode the umask gives any new file (as open(path, 'w') would; not
    mkstemp's 0600): the temporary file is created with 0o666 and the kernel applies the umask."""
    arrays = {f'param/{k}': to_host(v) for k, v in params.items()}
    if optimizer is not None:
        arrays.update({f'opt/{k}': to_host(v) for k, v in optimizer.state_arrays().items()})
        meta_opt = {'rule': optimizer.rule, 'hyper': optimizer.hyper}
    else:
        meta_opt = None
    meta = {'config': cfg.to_dict(), 'optimizer': meta_opt, 'extra': extra or {}}
    arrays['meta'] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f'.ckpt-{os.getpid()}-{secrets.token_hex(6)}.npz')
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, 'wb') as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path, cfg=None, params_like=None, xp=np):
    """Read a checkpoint -> (params, opt_state, meta). With `cfg` and/or `params_like`
    given, a checkpoint of a different model fails with a message naming what differs."""
    try:
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
        meta = json.loads(bytes(data.pop('meta')).decode())
        Config.from_dict(meta['config'])              # a readable file without a model config is damaged too
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist")
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}: {e}); "
                              "delete it to start afresh") from e
    if cfg is not None:
        saved = Config.from_dict(meta['config']).to_dict()
        diffs = [f"{k}: checkpoint {saved[k]!r} vs model {v!r}" for k, v in cfg.to_dict().items()
                 if saved.get(k) != v]
        if diffs:
            raise CheckpointError(f"checkpoint {path} was made for a different model: " + '; '.join(diffs))
    params = {k[6:]: v for k, v in data.items() if k.startswith('param/')}
    if params_like is not None:
        diffs = []
        for k in sorted(set(params) | set(params_like)):
            if k not in params:
                diffs.append(f"{k}: missing in checkpoint")
            elif k not in params_like:
                diffs.append(f"{k}: not in model")
            elif tuple(params[k].shape) != tuple(params_like[k].shape):
                diffs.append(f"{k}: checkpoint shape {tuple(params[k].shape)} vs model {tuple(params_like[k].shape)}")
            elif params[k].dtype != params_like[k].dtype:
                diffs.append(f"{k}: checkpoint dtype {params[k].dtype} vs model {params_like[k].dtype}")
        if diffs:
            raise CheckpointError(f"checkpoint {path} does not match the model: " + '; '.join(diffs))
    bad = [k for k, v in params.items() if v.dtype.kind == 'f' and not np.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"checkpoint {path} holds NaN or inf in {', '.join(bad)}: a diverged or damaged "
                              "state, which training cannot continue from; delete it to start afresh")
    params = {k: to_device(v, xp) for k, v in params.items()}
    opt_state = {k[4:]: v for k, v in data.items() if k.startswith('opt/')}
    return params, opt_state, meta


# =========================================================================== gradient check

def _gradcheck_groups(cfg, p, tasks, n_samples, rng):
    """{parameter key: [(label, flat indices)]}: the coordinates gradient_check samples.

    The generator's output layer W (dim_L, P) and b (P,) are sampled per classifier
    tensor: about n_samples / (number of tensors) coordinates in each tensor's columns
    (all of them when fewer), so the columns of small tensors (the biases, out.w) are
    checked as surely as conv2.w's 6,400; z is sampled in the rows of the batch's tasks
    (and a few in the unused rows, whose gradient must be 0); the hidden layers uniformly.
    n_samples None: every coordinate (still grouped by tensor).
    """
    from nn.gradcheck import sample_indices
    groups = {}
    layout, P = classifier_layout(cfg)
    per_tensor = None if n_samples is None else max(1, -(-n_samples // len(layout)))
    for k, v in p.items():
        if cfg.generator == 'dense' and k in ('gen.out.w', 'gen.out.b'):
            rows = v.shape[0] if k == 'gen.out.w' else 1
            groups[k] = []
            for name, (off, n, _) in layout.items():
                j = sample_indices((rows, n), per_tensor, rng)          # (row, column in the tensor)
                groups[k].append((name, (j // n) * P + off + j % n))
        elif k == 'z':
            used = np.isin(np.arange(v.shape[0]), tasks)
            groups[k] = []
            for label, rows, n in [('used rows', np.flatnonzero(used), n_samples),
                                   ('unused rows', np.flatnonzero(~used), None if n_samples is None
                                    else max(1, n_samples // 10))]:
                if len(rows):                                            # (every task in the batch: none unused)
                    j = sample_indices((len(rows), v.shape[1]), n, rng)
                    groups[k].append((label, rows[j // v.shape[1]] * v.shape[1] + j % v.shape[1]))
        else:
            groups[k] = [('all', sample_indices(v.shape, n_samples, rng))]
    return groups


def gradient_check(cfg, tasks, m=3, n_samples=200, seed=0, h=1e-5):
    """Compare loss_and_grads with centred finite differences in float64.

    Random, non-trivial inputs: random z (not one-hot), random generator biases, weights
    scaled so the tanh is neither saturated nor linear, random images and labels; the
    batch holds m images of each task in `tasks` (several tasks = a mixed step).
    The sampled coordinates (n_samples per parameter, None = all) are grouped as
    _gradcheck_groups says: per classifier tensor in the generator's output layer.
    Returns {parameter key: the largest rel_error of its groups}.
    Raises RuntimeError when a group's sampled numerical gradient is at most 1e-8 in
    magnitude (except z's unused rows, which must give 0): a check of zeros proves nothing.
    h: the finite-difference step. Leaky ReLU has a kink at 0: a step that moves some
    pre-activation across it makes the difference quotient wrong (not the backward). In the
    original configuration (37,165 weights feeding each pre-activation) h = 1e-5 does that
    for a few coordinates (worst errors 1e-4 to 9e-4, falling to 2e-9 to 5e-9 at h = 1e-6:
    results/gradcheck-h-s12.txt), so its case uses h = 1e-6.
    """
    r = np.random.default_rng(seed)
    p = init_params(cfg, seed=seed, dtype=np.float64)
    p['z'] = r.normal(size=p['z'].shape)
    scale = 3.0 if cfg.gen_hidden else 2.0
    for k in generator_keys(p):
        p[k] = r.normal(0, 0.1, size=p[k].shape) if k.endswith('.b') else p[k] * scale
    x = r.normal(size=(len(tasks), m) + cfg.image_shape)
    y = (r.random((len(tasks), m)) > 0.5).astype(np.float64)
    # Saturated logits would make every gradient ~0 and the check meaningless: shrink the
    # generator's output layer until the logits are moderate (|logit| < 4).
    Z = p['z'][np.asarray(tasks)]
    for _ in range(200):
        if np.abs(forward_from_z(p, Z, x, cfg)).max() < 4:
            break
        p['gen.out.w'] *= 0.8
        p['gen.out.b'] *= 0.8
    else:
        raise RuntimeError('gradient_check: could not bring the logits out of saturation')
    _, grads, _ = loss_and_grads(p, x, y, tasks, cfg)
    f = lambda: loss_and_grads(p, x, y, tasks, cfg)[0]
    return _check_groups(f, p, grads, _gradcheck_groups(cfg, p, tasks, n_samples, r), 'gradient_check', h)


def _check_groups(f, p, grads, groups, name, h=1e-5):
    """{key: the largest rel_error of its groups} for groups {key: [(label, flat indices)]}
    as _gradcheck_groups gives them (also hyper's check). A group whose sampled numerical
    gradient is at most 1e-8 raises, except z's unused rows, whose gradient must be 0."""
    from nn.gradcheck import check_gradient
    return {k: max(check_gradient(f, p[k], grads[k], h=h, idx=idx, name=f'{name}: {k} ({label})',
                                  min_grad=None if label == 'unused rows' else 1e-8) for label, idx in g)
            for k, g in groups.items()}


GRADCHECK_CASES = {
    'small, tanh': dict(image_shape=(8, 8, 3), conv_filters=(3, 4), kernel=3, fc=(5,), z_dim=6, n_tasks=4),
    'small, linear output': dict(image_shape=(8, 8, 3), conv_filters=(3, 4), kernel=3, fc=(5,), z_dim=6,
                                 n_tasks=4, gen_output='linear'),
    'small, 2 hidden layers': dict(image_shape=(8, 8, 3), conv_filters=(3, 4), kernel=3, fc=(5,), z_dim=6,
                                   n_tasks=4, gen_hidden=(7, 5)),
    'original (37,165 generated weights)': dict(n_tasks=5),
}
GRADCHECK_H = {'original (37,165 generated weights)': 1e-6}      # see gradient_check's h


def main(argv=None):
    import argparse
    import time
    ap = argparse.ArgumentParser(description='SuperNet: parameter counts and the whole-model gradient check '
                                             '(float64 centred differences, h = 1e-5; 1e-6 for the original '
                                             'configuration, whose leaky-ReLU kinks a 1e-5 step can cross).')
    ap.add_argument('--samples', type=int, default=200, help='coordinates sampled per parameter tensor')
    ap.add_argument('--seed', type=int, default=0)
    args = ap.parse_args(argv)
    c = count_params(Config())
    print(f"original configuration: classifier {c['classifier']:,} weights (all generated), generator "
          f"{c['generator']:,} parameters (= {c['classifier']:,} x {Config().z_dim + 1}), z {c['z_per_task']} per task")
    print(f"{'case':40s} {'tasks in batch':>14s}  max rel. error per parameter")
    worst = 0.0
    for name, kw in GRADCHECK_CASES.items():
        for tasks in ([1], [0, 2, 3]):
            t0 = time.perf_counter()
            errs = gradient_check(Config(**kw), tasks, n_samples=args.samples, seed=args.seed,
                                  h=GRADCHECK_H.get(name, 1e-5))
            worst = max(worst, max(errs.values()))
            cells = ', '.join(f'{k} {v:.1e}' for k, v in errs.items())
            print(f"{name:40s} {str(tasks):>14s}  {cells}  ({time.perf_counter() - t0:.1f} s)")
    print(f"worst relative error: {worst:.2e} ({'PASS' if worst < 1e-6 else 'FAIL'}: bound 1e-6)")
    return 0 if worst < 1e-6 else 1


if __name__ == '__main__':
    raise SystemExit(main())
