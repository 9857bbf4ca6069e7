"""Optimizers, CS231n style: `update(w, dw, config) -> config`, updating w IN PLACE.

Per-parameter state lives in `config` (created as xp.zeros_like(w) on first use),
so nothing is hidden: save the configs and you have saved the optimizer.

  sgd_momentum  v = mu*v - lr*g;  w += v
  rmsprop       (TensorFlow 1 semantics, to match the original SuperNet runs)
                ms = ms + (1-decay)*(g*g - ms)        ms starts at ONES, as in TF1
                w -= lr * g / sqrt(ms + eps)          eps inside the sqrt, default 1e-10
                (momentum > 0: mom = momentum*mom + lr*g/sqrt(ms+eps); w -= mom)
                (a rank-1 LowRank g: ms = decay*ms + (1-decay)*g*g, the same up to rounding)
  adam          m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g
                w -= lr * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)

On the CPU the updates run over cache-sized chunks of the flat parameter (256K
values) with a chunk-sized scratch buffer: the passes of an update run on data in
cache (L3 at least) and no temporary the size of the (3.75M-element) generator is ever
allocated. With several CPU threads
(nn.backend.set_num_threads) the chunks are shared out, one scratch buffer per
thread. On the GPU it is one pass.

A rank-1 LowRank gradient g = u v (one task in the step, the usual case) is never built
by rmsprop at all: g*g = u^2 v^2 and g / s = v / s * u are broadcast products of a column
and a row, so the update makes 8 passes over a chunk instead of 11 (results/rmsprop-rank1.txt).
"""
import numpy as np

from .backend import get_num_threads, get_xp, parallel_map, split_range
from .layers import small_product_slices

_CHUNK = 1 << 18      # 256K floats = 1 MB per array. Fewer chunks, fewer numpy calls: the
                      # step at batch 20 0.93-0.96x the time of 128K chunks, none more than
                      # 1% slower (results/chunk-256k-vs-128k.txt; 128K was best of 32K..256K
                      # on the sessions 1-3 host)


class LowRank:
    """A gradient given as the product U @ V, never formed in memory.

    U (rows, r), V (r, cols). The generator's output-layer gradient is one: dW = h.T @ dpre
    has rank G (the tasks in the step), 3.75M values made from 100*G + G*37,165 numbers.
    Written out and read back by the optimizer it is 30 MB of memory traffic per step;
    instead the update rules build it chunk by chunk, in cache, as they apply it (RMSProp
    at rank 1, the usual case, never builds it: see rmsprop).
    materialize() gives the array (what a plain gradient would be).
    """

    def __init__(self, U, V):
        if U.ndim != 2 or V.ndim != 2 or U.shape[1] != V.shape[0]:
            raise ValueError(f"LowRank: U {tuple(U.shape)} @ V {tuple(V.shape)} is not a matrix product")
        self.U, self.V = U, V
        self.shape = (U.shape[0], V.shape[1])
        self.dtype = get_xp(U, V).result_type(U.dtype, V.dtype)

    def rows(self, r, out=None):
        """Rows r of U @ V. Rank 1 (one task in the step): the outer product as a broadcast
        multiply, plus 0.0 so that a zero product is +0.0 as in the matrix product (which
        sums onto zero), not -0.0: the same bits as xp.dot, measured 2.3x faster than it
        (results/performance-history.md, session 7). Higher ranks: matrix products over
        column blocks small enough for OpenBLAS's small-matrix kernels
        (nn.layers.small_product_slices): a chunk's 7 rows at rank 8 in 52 us, against 169 us
        whole and 243 us by xp.dot (results/lowrank-blocks.txt)."""
        xp = get_xp(self.U, self.V)
        if self.U.shape[1] == 1:
            out = xp.multiply(self.U[r], self.V, out=out)      # (rows, 1) * (1, cols)
            xp.add(out, 0.0, out=out)                           # -0.0 -> +0.0, else unchanged
            return out
        U, V = self.U[r], self.V
        if out is None:
            out = xp.empty((U.shape[0], V.shape[1]), dtype=self.dtype)
        for c in small_product_slices(xp, 0, V.shape[1], U.shape[1], U.shape[0]):
            xp.matmul(U, V[:, c], out=out[:, c])
        return out

    def materialize(self):
        return self.rows(slice(None))


def _scratch(xp, w, config, n_buffers, size):
    """(n_buffers, size) scratch rows, kept in config between calls (not state: never saved)."""
    buf = config.get('_scratch')
    if (buf is None or buf.shape[0] < n_buffers or buf.shape[1] < size or buf.dtype != w.dtype
            or get_xp(buf) is not xp):
        buf = xp.empty((n_buffers, size), dtype=w.dtype)
        config['_scratch'] = buf
    return buf


def _update_in_chunks(kernel, config, w, dw, *state, rank1=None):
    """kernel(t, w_chunk, g_chunk, *state_chunks) over matching flat chunks, t a
    chunk-sized scratch; the chunks are shared out over the CPU threads. A LowRank dw is
    built a block of whole rows at a time into a second scratch (formed whole on a device,
    or when its dtype is not w's). If the rule gives `rank1` and dw is a rank-1 LowRank
    whose factors have w's dtype, rank1(t, w_rows, rows, *state_rows) runs instead, on
    (rows, cols) chunks, and builds what it needs of u[rows] v itself (dw is not built)."""
    xp = get_xp(w, *state)
    if not all(a.flags.c_contiguous for a in (w,) + state):
        raise ValueError("optimizer: a parameter and its state must be C-contiguous (they are updated in place)")
    lowrank = isinstance(dw, LowRank)
    if lowrank and (xp is not np or dw.dtype != w.dtype or w.shape[1] == 0):
        dw, lowrank = dw.materialize(), False
    rank1 = rank1 if lowrank and dw.U.shape[1] == 1 and dw.U.dtype == dw.V.dtype else None
    if lowrank:
        cols = w.shape[1]
        step = max(1, _CHUNK // cols)                           # whole rows per chunk
        rows = [slice(r, min(r + step, w.shape[0])) for r in range(0, w.shape[0], step)]
        pieces = [slice(r.start * cols, r.stop * cols) for r in rows]
        size = min(step, w.shape[0]) * cols
        g = None
    else:
        step = _CHUNK if xp is np else max(w.size, 1)
        pieces = [slice(s, s + step) for s in range(0, w.size, step)]
        size = min(step, w.size)
        g = xp.ascontiguousarray(dw).reshape(-1)                # one copy at most, not one per chunk
    flats = [a.reshape(-1) for a in (w,) + state]               # views: the arrays are contiguous
    n = max(1, min(get_num_threads(), len(pieces))) if xp is np else 1
    scratch = _scratch(xp, w, config, 2 * n if lowrank and rank1 is None else n, size)

    def run(i_part):
        i, part = i_part
        for k in range(part.start, part.stop):
            sl = pieces[k]
            wc = flats[0][sl]
            if rank1 is not None:
                rank1(scratch[i, :wc.size].reshape(-1, cols), wc.reshape(-1, cols), rows[k],
                      *(f[sl].reshape(-1, cols) for f in flats[1:]))
                continue
            if lowrank:
                gc = scratch[n + i, :wc.size]
                dw.rows(rows[k], out=gc.reshape(-1, cols))
            else:
                gc = g[sl]
            kernel(scratch[i, :wc.size], wc, gc, *(f[sl] for f in flats[1:]))

    parallel_map(run, enumerate(split_range(len(pieces), n)))


def _check(w, dw, name):
    if w.shape != dw.shape:
        raise ValueError(f"{name}: gradient shape {tuple(dw.shape)} != parameter shape {tuple(w.shape)}")


def sgd(w, dw, config=None):
    """Plain SGD. config: learning_rate."""
    config = {} if config is None else config
    config.setdefault('learning_rate', 1e-2)
    _check(w, dw, 'sgd')
    lr = config['learning_rate']
    xp = get_xp(w)

    def kernel(t, wc, gc):
        xp.multiply(gc, lr, out=t)
        wc -= t
    _update_in_chunks(kernel, config, w, dw)
    return config


def sgd_momentum(w, dw, config=None):
    """SGD with momentum. config: learning_rate, momentum, velocity (state)."""
    config = {} if config is None else config
    config.setdefault('learning_rate', 1e-2)
    config.setdefault('momentum', 0.9)
    _check(w, dw, 'sgd_momentum')
    xp = get_xp(w, dw)
    if 'velocity' not in config:
        config['velocity'] = xp.zeros_like(w)
    lr, mu = config['learning_rate'], config['momentum']

    def kernel(t, wc, gc, vc):
        vc *= mu
        xp.multiply(gc, lr, out=t)
        vc -= t
        wc += vc
    _update_in_chunks(kernel, config, w, dw, config['velocity'])
    return config


def rmsprop(w, dw, config=None):
    """RMSProp with TF1 semantics. config: learning_rate, decay, epsilon, momentum,
    cache (the mean square, state, starts at ones), mom (state, only if momentum>0)."""
    config = {} if config is None else config
    config.setdefault('learning_rate', 1e-4)
    config.setdefault('decay', 0.9)
    config.setdefault('epsilon', 1e-10)
    config.setdefault('momentum', 0.0)
    _check(w, dw, 'rmsprop')
    xp = get_xp(w, dw)
    if 'cache' not in config:
        config['cache'] = xp.ones_like(w)
    lr, rho, eps, mu = (config['learning_rate'], config['decay'], config['epsilon'],
                        config['momentum'])
    if mu > 0 and 'mom' not in config:
        config['mom'] = xp.zeros_like(w)

    def apply(t, wc, mc):                   # t = lr * g / sqrt(ms + eps)
        if mc is not None:
            mc *= mu
            mc += t
            wc -= mc
        else:
            wc -= t

    def kernel(t, wc, gc, ms, mc=None):
        xp.multiply(gc, gc, out=t)          # t  = g^2
        t -= ms                             # t  = g^2 - ms
        t *= 1 - rho
        ms += t                             # ms = ms + (1-rho)(g^2 - ms), as TF1
        xp.add(ms, eps, out=t)
        xp.sqrt(t, out=t)
        xp.divide(gc, t, out=t)             # t  = g / sqrt(ms + eps)
        t *= lr
        apply(t, wc, mc)

    rank1 = None
    if isinstance(dw, LowRank) and dw.U.shape[1] == 1:   # used where _update_in_chunks can
        # g = u v (column times row): g^2 = ((1-rho) u^2) v^2 and lr g / s = (v / s) (lr u)
        u, v = dw.U, dw.V
        u_sq = float(1 - rho) * (u * u)     # (rows, 1), tiny
        v_sq = v * v                        # (1, cols)
        lr_u = float(lr) * u                # (rows, 1)

        def rank1(t, wr, r, ms, mc=None):
            ms *= rho
            xp.multiply(u_sq[r], v_sq, out=t)   # t = (1-rho) g^2, never g itself
            ms += t                         # ms = rho ms + (1-rho) g^2
            xp.add(ms, eps, out=t)
            xp.sqrt(t, out=t)
            xp.divide(v, t, out=t)          # t  = v / sqrt(ms + eps)
            t *= lr_u[r]                    # t  = lr g / sqrt(ms + eps)
            apply(t, wr, mc)
    _update_in_chunks(kernel, config, w, dw, config['cache'], *((config['mom'],) if mu > 0 else ()),
                      rank1=rank1)
    return config


def adam(w, dw, config=None):
    """Adam. config: learning_rate, beta1, beta2, epsilon, m, v (state), t (step)."""
    config = {} if config is None else config
    config.setdefault('learning_rate', 1e-3)
    config.setdefault('beta1', 0.9)
    config.setdefault('beta2', 0.999)
    config.setdefault('epsilon', 1e-8)
    config.setdefault('t', 0)
    _check(w, dw, 'adam')
    xp = get_xp(w, dw)
    if 'm' not in config:
        config['m'] = xp.zeros_like(w)
        config['v'] = xp.zeros_like(w)
    t_ = config['t'] + 1                 # counted once the update has run (a refused call changes nothing)
    b1, b2, eps = config['beta1'], config['beta2'], config['epsilon']
    # Python floats, not np.float64 scalars, which would run float32 updates in float64
    step = float(config['learning_rate'] * np.sqrt(1 - b2 ** t_) / (1 - b1 ** t_))
    eps_hat = float(eps * np.sqrt(1 - b2 ** t_))   # same update as eps added to the corrected sqrt(v)

    def kernel(t, wc, gc, mc, vc):
        mc *= b1
        xp.multiply(gc, 1 - b1, out=t)
        mc += t
        vc *= b2
        xp.multiply(gc, gc, out=t)
        t *= 1 - b2
        vc += t
        xp.sqrt(vc, out=t)
        t += eps_hat
        xp.divide(mc, t, out=t)
        t *= step
        wc -= t
    _update_in_chunks(kernel, config, w, dw, config['m'], config['v'])
    config['t'] = t_
    return config


RULES = {'sgd': sgd, 'momentum': sgd_momentum, 'rmsprop': rmsprop, 'adam': adam}
HYPER = {'sgd': ('learning_rate',), 'momentum': ('learning_rate', 'momentum'),
         'rmsprop': ('learning_rate', 'decay', 'epsilon', 'momentum'),
         'adam': ('learning_rate', 'beta1', 'beta2', 'epsilon')}      # each rule's settings
_STATE_KEYS = ('velocity', 'cache', 'mom', 'm', 'v')


class Optimizer:
    """Applies one update rule to a dict of parameters, one config per key.

    opt = Optimizer('rmsprop', learning_rate=1e-4)
    opt.step(params, grads)            # every key of grads
    opt.step(params, grads, keys=['z'])  # only z (the generator is frozen)
    """

    def __init__(self, rule='rmsprop', **hyper):
        if rule not in RULES:
            raise ValueError(f"unknown optimizer {rule!r}; choose from {sorted(RULES)}")
        unknown = sorted(set(hyper) - set(HYPER[rule]))
        if unknown:
            raise ValueError(f"optimizer {rule!r}: unknown setting(s) {unknown}; it takes {list(HYPER[rule])}")
        self.rule, self.hyper, self.configs = rule, dict(hyper), {}

    def step(self, params, grads, keys=None):
        for k in (grads if keys is None else keys):
            if k not in params:
                raise KeyError(f"optimizer: gradient for unknown parameter {k!r}")
            if k not in grads:
                raise KeyError(f"optimizer: no gradient for parameter {k!r} (keys={list(keys)!r})")
            cfg = self.configs.setdefault(k, dict(self.hyper))
            RULES[self.rule](params[k], grads[k], cfg)

    def state_arrays(self):
        """{'<param>/<slot>': array} of the state tensors, and the step counters."""
        out = {}
        for k, cfg in self.configs.items():
            for s in _STATE_KEYS:
                if s in cfg:
                    out[f'{k}/{s}'] = cfg[s]
            if 't' in cfg:
                out[f'{k}/t'] = np.asarray(cfg['t'])
        return out

    def load_state_arrays(self, arrays, to_device=lambda a: a):
        self.configs = {}
        for name, a in arrays.items():
            k, s = name.rsplit('/', 1)
            cfg = self.configs.setdefault(k, dict(self.hyper))
            cfg[s] = int(a) if s == 't' else to_device(a)
