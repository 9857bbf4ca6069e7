"""Optimizers, CS231n style: `update(w, dw, config) -> config`, updating w IN PLACE.

Per-parameter state lives in `config` (created as xp.zeros_like(w) on first use),
so nothing is hidden: save the configs and you have saved the optimizer.

  sgd_momentum  v = mu*v - lr*g;  w += v
  rmsprop       (TensorFlow 1 semantics, to match the original SuperNet runs)
                ms = ms + (1-decay)*(g*g - ms)        ms starts at ONES, as in TF1
                w -= lr * g / sqrt(ms + eps)          eps inside the sqrt, default 1e-10
                (momentum > 0: mom = momentum*mom + lr*g/sqrt(ms+eps); w -= mom)
  adam          m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g
                w -= lr * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)

On the CPU the updates run over L2-sized chunks of the flat parameter with a
chunk-sized scratch buffer: every pass stays in cache and no temporary the size
of the (3.75M-element) generator is ever allocated. On the GPU it is one pass.
"""
import numpy as np

from .backend import get_xp

_CHUNK = 1 << 16      # 64K floats = 256 KB per array: the 4 arrays of an update fit in L2 (1 MB)


def _chunks(xp, *arrays):
    """Yield tuples of matching flat chunks of the (contiguous) arrays."""
    flats = [a.reshape(-1) for a in arrays]
    n = flats[0].size
    step = _CHUNK if xp is np else max(n, 1)
    for s in range(0, n, step):
        yield tuple(f[s:s + step] for f in flats)


def _scratch(xp, w, config):
    buf = config.get('_scratch')
    size = min(w.size, _CHUNK) if xp is np else w.size
    if buf is None or buf.size < size or buf.dtype != w.dtype or get_xp(buf) is not xp:
        buf = xp.empty(size, dtype=w.dtype)
        config['_scratch'] = buf
    return buf


def _check(w, dw, name):
    if w.shape != dw.shape:
        raise ValueError(f"{name}: gradient shape {tuple(dw.shape)} != parameter shape {tuple(w.shape)}")


def sgd(w, dw, config=None):
    """Plain SGD. config: learning_rate."""
    config = {} if config is None else config
    config.setdefault('learning_rate', 1e-2)
    _check(w, dw, 'sgd')
    w -= config['learning_rate'] * dw
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
    tmp = _scratch(xp, w, config)
    for wc, gc, vc in _chunks(xp, w, dw, config['velocity']):
        t = tmp[:wc.size]
        vc *= mu
        xp.multiply(gc, lr, out=t)
        vc -= t
        wc += vc
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
    tmp = _scratch(xp, w, config)
    arrays = (w, dw, config['cache']) + ((config['mom'],) if mu > 0 else ())
    for chunk in _chunks(xp, *arrays):
        wc, gc, ms = chunk[:3]
        t = tmp[:wc.size]
        xp.multiply(gc, gc, out=t)          # t  = g^2
        t -= ms                             # t  = g^2 - ms
        t *= 1 - rho
        ms += t                             # ms = ms + (1-rho)(g^2 - ms)
        xp.add(ms, eps, out=t)
        xp.sqrt(t, out=t)
        xp.divide(gc, t, out=t)             # t  = g / sqrt(ms + eps)
        t *= lr
        if mu > 0:
            mc = chunk[3]
            mc *= mu
            mc += t
            wc -= mc
        else:
            wc -= t
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
    config['t'] += 1
    b1, b2, eps, t_ = config['beta1'], config['beta2'], config['epsilon'], config['t']
    # Python floats, not np.float64 scalars, which would run float32 updates in float64
    step = float(config['learning_rate'] * np.sqrt(1 - b2 ** t_) / (1 - b1 ** t_))
    eps_hat = float(eps * np.sqrt(1 - b2 ** t_))   # same update as eps added to the corrected sqrt(v)
    tmp = _scratch(xp, w, config)
    for wc, gc, mc, vc in _chunks(xp, w, dw, config['m'], config['v']):
        t = tmp[:wc.size]
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
    return config


RULES = {'sgd': sgd, 'momentum': sgd_momentum, 'rmsprop': rmsprop, 'adam': adam}
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
        self.rule, self.hyper, self.configs = rule, dict(hyper), {}

    def step(self, params, grads, keys=None):
        for k in (grads if keys is None else keys):
            if k not in params:
                raise KeyError(f"optimizer: gradient for unknown parameter {k!r}")
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
