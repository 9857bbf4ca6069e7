"""The loss (value, gradient, stability) and the optimizers (against their textbook formulas)."""
import numpy as np
import pytest

from nn import optim
from nn.gradcheck import check_gradient, rel_error
from nn.loss import sigmoid_cross_entropy


TOL = 1e-8      # the loss's gradient check; a correct float64 gradient lands near 1e-11


def test_loss_value_and_gradient():
    """A (3, 4) batch with random 0/1 targets: the mean is over all 12 entries, and each
    logit's gradient is its own (a mean over one axis, or a broadcast target, would show)."""
    r = np.random.default_rng(0)
    logits = r.normal(size=(3, 4)) * 2
    y = (r.random((3, 4)) > 0.5).astype(np.float64)
    assert 0 < y.sum() < y.size
    loss, dlogits = sigmoid_cross_entropy(logits, y)
    assert dlogits.shape == logits.shape
    p = 1 / (1 + np.exp(-logits))
    naive = np.mean(-y * np.log(p) - (1 - y) * np.log(1 - p))
    assert abs(float(loss) - naive) < 1e-12
    assert rel_error(dlogits, (p - y) / y.size) < 1e-12
    assert check_gradient(lambda: sigmoid_cross_entropy(logits, y)[0], logits, dlogits) < TOL


def test_loss_of_soft_targets():
    """Targets in [0, 1], not only 0/1: the same formula, minimal (zero gradient) where the
    logit's probability equals the target."""
    r = np.random.default_rng(4)
    logits, y = r.normal(size=8) * 2, r.random(8)
    loss, dlogits = sigmoid_cross_entropy(logits, y)
    p = 1 / (1 + np.exp(-logits))
    assert abs(float(loss) - np.mean(-y * np.log(p) - (1 - y) * np.log(1 - p))) < 1e-12
    assert rel_error(dlogits, (p - y) / y.size) < 1e-12
    at_target = np.log(y / (1 - y))
    assert np.abs(sigmoid_cross_entropy(at_target, y)[1]).max() < 1e-15


def test_loss_is_stable_for_large_logits():
    logits = np.array([-1e4, -100.0, 100.0, 1e4], dtype=np.float32)
    y = np.array([0.0, 1.0, 0.0, 1.0], dtype=np.float32)
    with np.errstate(over='raise', divide='raise', invalid='raise'):
        loss, d = sigmoid_cross_entropy(logits, y)
    # right answers give ~0 loss; the two wrong ones cost 100 each
    assert abs(float(loss) - 200.0 / 4) < 1e-3
    assert np.all(np.isfinite(d))
    assert np.allclose(d, [0.0, -0.25, 0.25, 0.0])


def test_loss_rejects_bad_input():
    with pytest.raises(ValueError, match='same shape'):
        sigmoid_cross_entropy(np.zeros((4, 1)), np.zeros(4))
    with pytest.raises(ValueError, match='empty'):
        sigmoid_cross_entropy(np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match='NaN or inf'):
        sigmoid_cross_entropy(np.array([0.0, np.nan]), np.array([0.0, 1.0]), check_finite=True)
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        sigmoid_cross_entropy(np.array([0.0, 1.0]), np.array([0.0, 2.0]), check_finite=True)
    loss, _ = sigmoid_cross_entropy(np.array([0.0, 1.0]), np.array([0.0, 1.0]), check_finite=True)
    assert np.isfinite(float(loss))


def _textbook(rule, w, grads, cfg):
    """The same updates written the obvious way, on float64 copies."""
    w = w.copy()
    state = {}
    for t, g in enumerate(grads, 1):
        if rule == 'sgd':
            w = w - cfg['learning_rate'] * g
        elif rule == 'sgd_momentum':
            v = state.get('v', np.zeros_like(w))
            v = cfg['momentum'] * v - cfg['learning_rate'] * g
            w = w + v
            state['v'] = v
        elif rule == 'rmsprop':
            ms = state.get('ms', np.ones_like(w))           # TF1 starts the mean square at 1
            ms = cfg['decay'] * ms + (1 - cfg['decay']) * g * g
            w = w - cfg['learning_rate'] * g / np.sqrt(ms + cfg['epsilon'])
            state['ms'] = ms
        elif rule == 'adam':
            m = state.get('m', np.zeros_like(w))
            v = state.get('v', np.zeros_like(w))
            m = cfg['beta1'] * m + (1 - cfg['beta1']) * g
            v = cfg['beta2'] * v + (1 - cfg['beta2']) * g * g
            mh, vh = m / (1 - cfg['beta1'] ** t), v / (1 - cfg['beta2'] ** t)
            w = w - cfg['learning_rate'] * mh / (np.sqrt(vh) + cfg['epsilon'])
            state['m'], state['v'] = m, v
    return w


@pytest.mark.parametrize('rule,cfg', [
    ('sgd', dict(learning_rate=0.1)),
    ('sgd_momentum', dict(learning_rate=0.1, momentum=0.9)),
    ('rmsprop', dict(learning_rate=1e-2, decay=0.9, epsilon=1e-10, momentum=0.0)),
    ('rmsprop', dict(learning_rate=1e-2, decay=0.9, epsilon=0.5, momentum=0.0)),   # epsilon that matters
    ('adam', dict(learning_rate=1e-2, beta1=0.9, beta2=0.999, epsilon=1e-8)),
])
@pytest.mark.parametrize('size', [7, (3, 50000)])      # the second spans several chunks
def test_optimizer_matches_textbook(rule, cfg, size):
    r = np.random.default_rng(1)
    w0 = r.normal(size=size)
    grads = [r.normal(size=size) * (k + 1) for k in range(4)]
    w = w0.copy()
    config = dict(cfg)
    for g in grads:
        config = getattr(optim, rule)(w, g, config)
    assert rel_error(w, _textbook(rule, w0, grads, cfg)) < 1e-12
    assert not np.array_equal(w, w0)


def test_rmsprop_momentum_and_in_place():
    r = np.random.default_rng(2)
    w = r.normal(size=100).astype(np.float32)
    ref = w.copy()
    ptr = w.__array_interface__['data'][0]
    cfg = {'learning_rate': 1e-2, 'momentum': 0.5}
    mom = np.zeros(100)
    ms = np.ones(100)
    for _ in range(3):
        g = r.normal(size=100).astype(np.float32)
        optim.rmsprop(w, g, cfg)
        ms = 0.9 * ms + 0.1 * g.astype(np.float64) ** 2
        mom = 0.5 * mom + 1e-2 * g / np.sqrt(ms + 1e-10)
        ref = ref - mom
    assert w.__array_interface__['data'][0] == ptr and w.dtype == np.float32
    assert rel_error(w, ref) < 1e-6


def test_optimizer_dict_updates_only_given_keys_and_round_trips_state():
    r = np.random.default_rng(3)
    params = {'a': r.normal(size=5), 'b': r.normal(size=(2, 3))}
    grads = {k: r.normal(size=v.shape) for k, v in params.items()}
    before_a = params['a'].copy()
    opt = optim.Optimizer('adam', learning_rate=0.1)
    opt.step(params, grads, keys=['b'])
    assert np.array_equal(params['a'], before_a)
    state = opt.state_arrays()
    assert set(state) == {'b/m', 'b/v', 'b/t'}
    opt2 = optim.Optimizer('adam', learning_rate=0.1)
    opt2.load_state_arrays({k: v.copy() for k, v in state.items()})
    p1 = {k: v.copy() for k, v in params.items()}
    p2 = {k: v.copy() for k, v in params.items()}
    opt.step(p1, grads, keys=['b'])
    opt2.step(p2, grads, keys=['b'])
    assert np.array_equal(p1['b'], p2['b'])
    with pytest.raises(ValueError, match='unknown optimizer'):
        optim.Optimizer('lbfgs')
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['lr'\]"):     # not trained at the default
        optim.Optimizer('rmsprop', lr=0.5)
    with pytest.raises(ValueError, match='unknown setting'):
        optim.Optimizer('adam', beta_1=0.0)
    with pytest.raises(KeyError, match="no gradient for parameter 'a'"):
        opt.step(p1, {'b': grads['b']}, keys=['a', 'b'])
    # a refused update changes nothing, not even Adam's step count
    cfg = {}
    with pytest.raises(ValueError, match='C-contiguous'):
        optim.adam(np.zeros((4, 4)).T, np.zeros((4, 4)), cfg)
    assert cfg['t'] == 0
    with pytest.raises(ValueError, match='gradient shape'):
        optim.rmsprop(np.zeros(3), np.zeros(4), {})
