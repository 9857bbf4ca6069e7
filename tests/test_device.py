"""The compute path is device-agnostic: every layer, the loss and the optimizers run on
a strict stand-in for CuPy that refuses host arrays and np. calls (so a stray np. in
the hot path fails here, on a CPU-only machine). On a machine with CuPy and a GPU the
same checks run on the real device; elsewhere they skip."""
import numpy as np
import pytest

from nn import layers as L, optim
from nn.backend import get_device_module, get_xp, to_device, to_host
from nn.gradcheck import rel_error
from nn.loss import sigmoid_cross_entropy
from tests.strict_xp import MixError, StrictArray, strict


def _all_layers(xp, dtype=np.float64, seed=0):
    """Forward + backward of every layer and the loss; returns host copies of all outputs."""
    r = np.random.default_rng(seed)
    dev = lambda *s: to_device(r.normal(size=s).astype(dtype), xp)
    res = {}
    x = dev(2, 3, 8, 8, 3)                        # grouped: 2 groups of 3 images
    w, b = dev(2, 5, 5, 3, 4), dev(2, 4)
    h, c1 = L.conv_forward(x, w, b, 2, 'SAME')
    a, c2 = L.leaky_relu_forward(h, 0.2)
    f, c3 = L.flatten_forward(a, keep=2)
    w2, b2 = dev(2, f.shape[-1], 1), dev(2, 1)
    logits, c4 = L.dense_forward(f, w2, b2)
    t, c5 = L.tanh_forward(logits)
    s, c6 = L.sigmoid_forward(t)
    y = to_device((r.random(s.shape) > 0.5).astype(dtype), xp)
    loss, ds = sigmoid_cross_entropy(s, y)
    dt = L.sigmoid_backward(ds, c6)
    dl = L.tanh_backward(dt, c5)
    df, dw2, db2 = L.dense_backward(dl, c4)
    da = L.flatten_backward(df, c3)
    dh = L.leaky_relu_backward(da, c2)
    dx, dw, db = L.conv_backward(dh, c1)
    for k, v in dict(loss=loss, dx=dx, dw=dw, db=db, dw2=dw2, db2=db2).items():
        assert get_xp(v) is xp, f'{k} left the device'
        res[k] = to_host(v)
    for rule in ('sgd', 'sgd_momentum', 'rmsprop', 'adam'):
        p = to_device(np.linspace(-1, 1, 40000).astype(dtype), xp)
        g = to_device(r.normal(size=40000).astype(dtype), xp)
        cfg = getattr(optim, rule)(p, g, None)
        getattr(optim, rule)(p, g, cfg)
        assert get_xp(p) is xp
        res[rule] = to_host(p)
    return res


def test_strict_standin_really_rejects_host_mixing():
    a = strict.asarray(np.ones(3))
    with pytest.raises(MixError):
        a + np.ones(3)
    with pytest.raises(MixError):
        np.sum(a)
    with pytest.raises(MixError):
        np.asarray(a)
    with pytest.raises(TypeError):
        np.exp(a)
    with pytest.raises(MixError):
        strict.matmul(a, np.ones(3))


def test_every_layer_runs_on_the_strict_device_and_matches_numpy():
    host = _all_layers(np)
    dev = _all_layers(strict)
    for k in host:
        assert rel_error(host[k], dev[k]) < 1e-14, k


def test_a_host_array_in_the_hot_path_is_caught():
    x = strict.asarray(np.ones((1, 4, 4, 1)))
    w_host = np.ones((3, 3, 1, 1))                 # forgot to move the weight
    with pytest.raises(TypeError):
        L.conv_forward(x, w_host, strict.asarray(np.ones(1)), 1, 'SAME')
    for rule in ('sgd', 'sgd_momentum', 'rmsprop', 'adam'):   # a host gradient for a device parameter
        with pytest.raises(TypeError):
            getattr(optim, rule)(strict.asarray(np.ones(40000)), np.ones(40000), None)


def test_device_selection_errors():
    assert get_device_module('cpu') is np
    with pytest.raises(ValueError, match='unknown device'):
        get_device_module('tpu')
    try:
        import cupy  # noqa: F401
        have_cupy = True
    except ImportError:
        have_cupy = False
    if not have_cupy:
        with pytest.raises(RuntimeError, match='needs CuPy'):
            get_device_module('gpu')
        return
    try:                                           # CuPy installed: the GPU, or a clear error without one
        gpu = get_device_module('gpu')
    except RuntimeError as e:
        assert 'no CUDA device' in str(e)
    else:
        assert gpu is cupy and get_device_module('cuda') is cupy


def _cupy_or_skip():
    cp = pytest.importorskip('cupy')
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip('no CUDA device')
    except Exception as e:      # driver missing
        pytest.skip(f'no usable CUDA device: {e}')
    return get_device_module('gpu')


def test_cupy_matches_numpy():
    cp = _cupy_or_skip()
    host = _all_layers(np)
    dev = _all_layers(cp)
    for k in host:
        assert rel_error(host[k], dev[k]) < 1e-10, k


def test_strict_arrays_are_registered():
    assert get_xp(strict.zeros(2)) is strict
    assert isinstance(strict.zeros(2), StrictArray)
    assert get_xp(np.zeros(2)) is np


def test_whole_supernet_step_runs_on_the_strict_device():
    """loss_and_grads (dense generator, mixed tasks) + RMSProp, on the stand-in, equals numpy."""
    import supernet as S
    from nn.optim import Optimizer
    cfg = S.Config(image_shape=(8, 8, 3), conv_filters=(3, 4), kernel=3, fc=(5,), z_dim=6, n_tasks=4,
                   gen_hidden=(7,))
    r = np.random.default_rng(0)
    x = r.normal(size=(2, 3, 8, 8, 3))
    y = (r.random((2, 3)) > 0.5).astype(np.float64)
    out = {}
    for xp in (np, strict):
        p = S.init_params(cfg, seed=0, xp=xp, dtype=np.float64)
        loss, g, _ = S.loss_and_grads(p, to_device(x, xp), to_device(y, xp), [1, 3], cfg)
        Optimizer('rmsprop', learning_rate=1e-2).step(p, g)
        assert all(get_xp(v) is xp for v in list(g.values()) + list(p.values()))
        out[xp] = {k: to_host(v) for k, v in p.items()}
    for k in out[np]:
        assert rel_error(out[np][k], out[strict][k]) < 1e-13, k


@pytest.mark.parametrize('C,F', [(3, 4), (4, 3)])       # dw from im2col(x), and by phase
def test_conv_of_an_empty_batch_on_host_and_device(C, F):
    """No images: an empty output, zero gradients, the same on the host and the device."""
    for xp in (np, strict):
        x = to_device(np.zeros((0, 8, 8, C)), xp)
        w, b = to_device(np.ones((5, 5, C, F)), xp), to_device(np.ones(F), xp)
        out, cache = L.conv_forward(x, w, b, 2)
        assert out.shape == (0, 4, 4, F)
        dx, dw, db = L.conv_backward(out, cache)
        assert dx.shape == (0, 8, 8, C) and dw.shape == (5, 5, C, F) and db.shape == (F,)
        assert not to_host(dw).any() and not to_host(db).any()
