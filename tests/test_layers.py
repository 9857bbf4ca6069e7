"""Every layer's backward against centred finite differences (float64), and the conv
forward against a slow direct-loop reference."""
import numpy as np
import pytest

from nn import layers as L
from nn.gradcheck import check_gradient, numerical_gradient, rel_error
from tests.strict_xp import strict

TOL = 1e-8      # the acceptance bound per layer; a correct float64 backward lands near 1e-11


def _rng(seed):
    return np.random.default_rng(seed)


def conv_reference(x, w, b, stride, pad):
    """Obviously-correct convolution: explicit padding, then a loop over every output pixel."""
    N, H, W, C = x.shape
    kh, kw, _, F = w.shape
    Ho, pt, pb = L.conv_output_size(H, kh, stride, pad if isinstance(pad, (str, int)) else pad[0])
    Wo, pl, pr = L.conv_output_size(W, kw, stride, pad if isinstance(pad, (str, int)) else pad[1])
    xp_ = np.zeros((N, H + pt + pb, W + pl + pr, C))
    xp_[:, pt:pt + H, pl:pl + W] = x
    out = np.zeros((N, Ho, Wo, F))
    for n in range(N):
        for i in range(Ho):
            for j in range(Wo):
                patch = xp_[n, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
                for f in range(F):
                    out[n, i, j, f] = np.sum(patch * w[:, :, :, f]) + b[f]
    return out


CONV_CASES = [
    # (N, H, W, C, kh, kw, F, stride, pad)
    (2, 7, 7, 3, 3, 3, 4, 1, 'SAME'),
    (2, 8, 8, 3, 5, 5, 4, 2, 'SAME'),      # the original's geometry: TF pads 1 before, 2 after
    (3, 9, 6, 2, 5, 3, 3, 2, 'SAME'),      # odd/even, non-square kernel
    (2, 8, 7, 3, 3, 3, 2, 1, 'VALID'),
    (2, 9, 9, 2, 3, 2, 3, 2, 'VALID'),
    (1, 6, 6, 2, 3, 3, 2, 2, 1),            # explicit symmetric padding
    (2, 5, 6, 2, 2, 3, 3, 1, ((0, 1), (2, 0))),  # explicit asymmetric padding
    # stride >= 3 with padding: the phase of the first pixel is (p - pad) % s, which for
    # s = 2 cannot tell -pad from +pad (and pad = 0 hides it altogether)
    (2, 10, 9, 2, 3, 3, 3, 3, 1),           # s 3, pad 1, F > C (dw from im2col(x))
    (2, 10, 9, 4, 3, 3, 3, 3, 1),           # s 3, pad 1, F <= C (dw by stride phase too)
    (2, 11, 10, 4, 5, 5, 3, 3, 'SAME'),     # s 3, TF SAME pads (1, 2) rows, (2, 2) columns
    (2, 11, 10, 2, 5, 5, 4, 3, 'SAME'),     # the same with F > C
    (2, 7, 8, 3, 2, 3, 2, 3, ((1, 0), (2, 1))),  # s 3 > kh: a row phase no tap reaches
    (1, 13, 12, 3, 5, 3, 2, 4, 2),          # s 4, pad 2: phases that are all padding
]


@pytest.mark.parametrize('case', CONV_CASES)
def test_conv_forward_matches_direct_loop(case):
    N, H, W, C, kh, kw, F, s, pad = case
    r = _rng(0)
    x, w, b = r.normal(size=(N, H, W, C)), r.normal(size=(kh, kw, C, F)), r.normal(size=F)
    out, _ = L.conv_forward(x, w, b, s, pad)
    ref = conv_reference(x, w, b, s, pad)
    assert out.shape == ref.shape
    assert rel_error(out, ref) < 1e-12


def test_same_padding_is_tensorflows():
    # TF SAME: 32 -> 16 with k=5, s=2: pad 1 top/left, 2 bottom/right
    assert L.conv_output_size(32, 5, 2, 'SAME') == (16, 1, 2)
    assert L.conv_output_size(16, 5, 2, 'SAME') == (8, 1, 2)
    assert L.conv_output_size(7, 3, 1, 'SAME') == (7, 1, 1)
    assert L.conv_output_size(8, 3, 1, 'VALID') == (6, 0, 0)


@pytest.mark.parametrize('case', CONV_CASES)
def test_conv_backward(case):
    N, H, W, C, kh, kw, F, s, pad = case
    r = _rng(1)
    x, w, b = r.normal(size=(N, H, W, C)), r.normal(size=(kh, kw, C, F)), r.normal(size=F)
    out, cache = L.conv_forward(x, w, b, s, pad)
    dout = r.normal(size=out.shape)
    dx, dw, db = L.conv_backward(dout, cache)
    f = lambda: L.conv_forward(x, w, b, s, pad)[0]
    assert check_gradient(f, x, dx, dout) < TOL
    assert check_gradient(f, w, dw, dout) < TOL
    assert check_gradient(f, b, db, dout) < TOL
    _, dw2, db2 = L.conv_backward(dout, cache, need_dx=False)
    assert np.array_equal(dw, dw2) and np.array_equal(db, db2)


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
@pytest.mark.parametrize('case', CONV_CASES)
def test_conv_item_copies_equal_plain_copies(case, dtype, monkeypatch):
    # On the CPU, im2col with short runs moves kernel rows as opaque items (L._items).
    # Forced on for every im2col (forward, dw, the input gradient's patch matrices), then
    # off: the same numbers, bit for bit.
    N, H, W, C, kh, kw, F, s, pad = case
    r = _rng(3)
    x, w, b = (r.normal(size=(2, N, H, W, C)).astype(dtype), r.normal(size=(2, kh, kw, C, F)).astype(dtype),
               r.normal(size=(2, F)).astype(dtype))
    taken = []
    packed = lambda a: a.strides[-1] == a.itemsize and a.strides[-2] == a.shape[-1] * a.itemsize
    monkeypatch.setattr(L, '_fast_copy', lambda xp, a, run: taken.append(packed(a)) or taken[-1])
    out, cache = L.conv_forward(x, w, b, s, pad)
    dout = r.normal(size=out.shape).astype(dtype)
    grads = L.conv_backward(dout, cache)
    assert taken and all(taken)                      # the item path really ran, for every im2col
    monkeypatch.setattr(L, '_fast_copy', lambda xp, a, run: False)
    out2, cache2 = L.conv_forward(x, w, b, s, pad)
    assert np.array_equal(out, out2)
    for a, e in zip(grads, L.conv_backward(dout, cache2)):
        assert a.dtype == e.dtype == dtype and np.array_equal(a, e)


def test_item_copies_only_for_short_runs_of_contiguous_values():
    a = np.zeros((1, 2, 6, 6, 16), np.float32)
    assert L._fast_copy(np, a, 15)                                  # conv1's im2col
    assert not L._fast_copy(np, a, 32) and not L._fast_copy(np, a, 80)   # the others
    assert not L._fast_copy(np, a[..., ::2], 8)                     # no contiguous last axis
    assert not L._fast_copy(np, a[..., :3], 15)                     # pixels not packed
    assert not L._fast_copy(np, a[:, :, :, ::2], 15)                # every second column


@pytest.mark.parametrize('view', [np.s_[..., ::2], np.s_[..., :3], np.s_[:, :, :, ::2]])
def test_im2col_of_views_that_cannot_take_items_takes_the_plain_copy(view):
    # channels 2 values apart, pixels not packed, every second column
    a = _rng(4).normal(size=(1, 2, 7, 12, 6))[view]
    cols = L._im2col(np, a, 3, 3, 2, 2, 2)
    assert np.array_equal(cols[0, 0], a[0, 0, :3, :3].reshape(-1))
    assert np.array_equal(cols[0, -1], a[0, 1, 2:5, 2:5].reshape(-1))


def test_row_blocks_for_small_products(monkeypatch):
    """Rows per block: at most _SMALL_GEMM_MNK multiply-adds, equal blocks where a nearby
    block count divides the rows; products small enough, too wide, a device, or 0: not cut."""
    assert L.small_product_block(np, 1280, 400, 16) == 128           # conv2's forward block: 10 x 128
    assert L.small_product_block(np, 6912, 75, 16) == 768            # conv1's: 9 x 768
    assert L.small_product_block(np, 1009, 400, 16) == 156           # a prime: 156-row blocks and the rest
    assert L.small_product_block(np, 150, 400, 16) is None           # already small
    assert L.small_product_block(np, 5000, 400, 400) is None         # blocks under 8 rows: whole
    assert L.small_product_block(strict, 1280, 400, 16) is None
    monkeypatch.setattr(L, '_SMALL_GEMM_MNK', 0)
    assert L.small_product_block(np, 1280, 400, 16) is None


@pytest.mark.parametrize('M', [1009, 1000])                   # with and without a remainder
def test_cut_products_equal_whole_ones(monkeypatch, M):
    monkeypatch.setattr(L, '_SMALL_GEMM_MNK', 40 * 5 * 50)  # 50-row blocks
    r = np.random.default_rng(M)
    a, b, c = r.normal(size=(2, M, 40)), r.normal(size=(2, 40, 5)), r.normal(size=(2, M, 5))
    assert L.small_product_block(np, M, 40, 5) == 50
    assert rel_error(L._mm(np, a, b), a @ b) < 1e-13
    out = np.full((2, M, 5), np.nan)
    assert L._mm(np, a, b, out=out) is out and rel_error(out, a @ b) < 1e-13
    assert rel_error(L._mm_tn(np, c, a), c.swapaxes(1, 2) @ a) < 1e-13


@pytest.mark.parametrize('k,s,pad,C,F', [
    (5, 2, 'SAME', 3, 4),          # the original's geometry, F > C
    (5, 3, 'SAME', 3, 4),          # stride 3, TF SAME padding (1, 2)
    (3, 3, 1, 4, 3),               # stride 3, pad 1, F <= C (dw by stride phase)
])
def test_conv_grouped_equals_per_group(k, s, pad, C, F):
    r = _rng(2)
    G, N, H = 3, 2, 8
    x, w, b = r.normal(size=(G, N, H, H, C)), r.normal(size=(G, k, k, C, F)), r.normal(size=(G, F))
    out, cache = L.conv_forward(x, w, b, s, pad)
    dout = r.normal(size=out.shape)
    dx, dw, db = L.conv_backward(dout, cache)
    for g in range(G):
        o, c = L.conv_forward(x[g], w[g], b[g], s, pad)
        assert rel_error(o, out[g]) < 1e-13
        dxg, dwg, dbg = L.conv_backward(dout[g], c)
        for a, e in [(dx[g], dxg), (dw[g], dwg), (db[g], dbg)]:
            assert rel_error(a, e) < 1e-13
    f = lambda: L.conv_forward(x, w, b, s, pad)[0]
    assert check_gradient(f, w, dw, dout, n_samples=60) < TOL
    assert check_gradient(f, x, dx, dout, n_samples=60) < TOL
    assert check_gradient(f, b, db, dout) < TOL


@pytest.mark.parametrize('grouped', [False, True])
def test_dense_backward(grouped):
    r = _rng(3)
    lead = (3,) if grouped else ()
    x, w, b = r.normal(size=lead + (5, 7)), r.normal(size=lead + (7, 4)), r.normal(size=lead + (4,))
    out, cache = L.dense_forward(x, w, b)
    assert out.shape == lead + (5, 4)
    dout = r.normal(size=out.shape)
    dx, dw, db = L.dense_backward(dout, cache)
    f = lambda: L.dense_forward(x, w, b)[0]
    for arr, grad in [(x, dx), (w, dw), (b, db)]:
        assert check_gradient(f, arr, grad, dout) < TOL


@pytest.mark.parametrize('name', ['leaky_relu', 'tanh', 'sigmoid'])
def test_activation_backward(name):
    r = _rng(4)
    x = r.normal(size=(4, 3, 5)) * 3
    x[np.abs(x) < 1e-3] = 0.5          # keep finite differences away from the kink
    fwd, bwd = getattr(L, name + '_forward'), getattr(L, name + '_backward')
    out, cache = fwd(x)
    dout = r.normal(size=out.shape)
    dx = bwd(dout, cache)
    assert check_gradient(lambda: fwd(x)[0], x, dx, dout) < TOL


def test_leaky_relu_values_and_flatten():
    x = np.array([-2.0, -0.5, 0.0, 0.5, 3.0])
    out, _ = L.leaky_relu_forward(x, 0.2)
    assert np.allclose(out, [-0.4, -0.1, 0.0, 0.5, 3.0])
    r = _rng(5)
    x = r.normal(size=(3, 2, 2, 4))
    out, cache = L.flatten_forward(x)
    assert out.shape == (3, 16) and np.array_equal(out[1], x[1].reshape(-1))
    dout = r.normal(size=out.shape)
    assert check_gradient(lambda: L.flatten_forward(x)[0], x, L.flatten_backward(dout, cache), dout) < TOL


def test_sigmoid_is_stable_for_large_inputs():
    x = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0], dtype=np.float32)
    with np.errstate(over='raise'):
        s = L.sigmoid(x)
    assert np.all(np.isfinite(s))
    assert s[0] == 0.0 and s[-1] == 1.0 and s[2] == 0.5


def test_layers_run_in_float32_and_float64():
    r = _rng(6)
    for dt in (np.float32, np.float64):
        x = r.normal(size=(2, 8, 8, 3)).astype(dt)
        w = r.normal(size=(5, 5, 3, 4)).astype(dt)
        b = r.normal(size=4).astype(dt)
        out, cache = L.conv_forward(x, w, b, 2, 'SAME')
        dx, dw, db = L.conv_backward(out, cache)
        assert out.dtype == dt and dx.dtype == dt and dw.dtype == dt and db.dtype == dt
        o2, c2 = L.dense_forward(x.reshape(2, -1), r.normal(size=(192, 4)).astype(dt), b)
        assert o2.dtype == dt and all(g.dtype == dt for g in L.dense_backward(o2, c2))


def test_conv_rejects_bad_shapes():
    r = _rng(7)
    x = r.normal(size=(2, 8, 8, 3))
    with pytest.raises(ValueError, match='3 channels but the weight expects 4'):
        L.conv_forward(x, r.normal(size=(3, 3, 4, 5)), r.normal(size=5))
    with pytest.raises(ValueError, match='do not fit'):
        L.conv_forward(x, r.normal(size=(3, 3, 3, 5)), r.normal(size=4))
    with pytest.raises(ValueError, match='do not fit'):
        L.conv_forward(x, r.normal(size=(3, 3, 5)), r.normal(size=5))
    with pytest.raises(ValueError, match='padding'):
        L.conv_forward(x, r.normal(size=(3, 3, 3, 5)), r.normal(size=5), 1, 'FULL')
    with pytest.raises(ValueError, match='does not fit'):
        L.conv_forward(x, r.normal(size=(9, 9, 3, 5)), r.normal(size=5), 1, 'VALID')
    with pytest.raises(ValueError, match='groups'):
        L.conv_forward(r.normal(size=(2, 1, 8, 8, 3)), r.normal(size=(3, 3, 3, 3, 5)), r.normal(size=(3, 5)))
    with pytest.raises(ValueError, match='features but the weight expects'):
        L.dense_forward(r.normal(size=(2, 5)), r.normal(size=(4, 3)), r.normal(size=3))
    w, b = r.normal(size=(3, 3, 3, 5)), r.normal(size=5)
    for pad in (-1, (1, 2), ((1, 1), (1, -1)), 1.5, True, ((1, 1),)):
        with pytest.raises(ValueError, match='padding must be'):
            L.conv_forward(x, w, b, 1, pad)
    for stride in (0, 1.0, True):
        with pytest.raises(ValueError, match='stride must be'):
            L.conv_forward(x, w, b, stride)
    # numpy integers are integers
    ref = L.conv_forward(x, w, b, 2, ((1, 0), (0, 1)))[0]
    assert np.array_equal(L.conv_forward(x, w, b, np.int64(2), ((np.int64(1), 0), (0, np.int32(1))))[0], ref)
    # dout must have the output's shape, not just its size
    out, cache = L.conv_forward(x, w, b, 2)
    with pytest.raises(ValueError, match="dout .* should be the forward's output shape"):
        L.conv_backward(out[None], cache)
    with pytest.raises(ValueError, match="dout .* should be the forward's output shape"):
        L.conv_backward(out.reshape(2, 16, 5), cache)



def _dense_case(seed, n, d, k):
    """A dense layer on random x (n, d), w (d, k), b (k,) for the checker's own tests:
    (x, w, b, dout, dw, f) with f() = the forward, reading x, w, b as they are."""
    r = _rng(seed)
    x, w, b = r.normal(size=(n, d)), r.normal(size=(d, k)), r.normal(size=k)
    out, cache = L.dense_forward(x, w, b)
    dout = r.normal(size=out.shape)
    return x, w, b, dout, L.dense_backward(dout, cache)[1], lambda: L.dense_forward(x, w, b)[0]

def test_gradcheck_detects_a_wrong_backward():
    """The checker itself can fail: a transposed dense gradient is caught."""
    x, w, b, dout, dw, f = _dense_case(8, 4, 4, 4)
    assert check_gradient(f, w, dw, dout) < TOL
    assert check_gradient(f, w, dw.T, dout) > 1e-2
    with pytest.raises(TypeError, match='float64'):
        numerical_gradient(f, w.astype(np.float32), dout)


def test_gradcheck_rejects_a_gradient_of_the_wrong_shape():
    """A backward returning the transpose of a square gradient is caught by the values
    (above); one of another shape must be refused, not flattened and compared."""
    x, w, b, dout, dw, f = _dense_case(9, 4, 3, 2)
    assert check_gradient(f, w, dw, dout) < TOL
    with pytest.raises(ValueError, match=r'shape \(2, 3\), the input \(3, 2\)'):
        check_gradient(f, w, dw.T, dout)
    with pytest.raises(ValueError, match='shape'):
        check_gradient(f, w, dw.reshape(-1), dout)


def test_gradcheck_perturbs_a_non_contiguous_input_in_place():
    """x may be a view (a transpose, a strided slice): the perturbation must reach the
    array f reads, and the gradient must come back in the view's own index order."""
    x, w, b, dout, dw, f = _dense_case(10, 4, 3, 5)
    wT = w.T                                          # (5, 3), not C-contiguous
    assert not wT.flags.c_contiguous
    assert check_gradient(f, wT, dw.T, dout) < TOL
    cols = w[:, ::2]                                  # (3, 3), a strided slice
    assert not cols.flags.c_contiguous
    assert check_gradient(f, cols, dw[:, ::2], dout) < TOL
    assert rel_error(numerical_gradient(f, cols, dout), dw[:, ::2].reshape(-1)) < TOL
    before = w.copy()
    numerical_gradient(f, wT, dout)
    assert np.array_equal(w, before)                  # every coordinate restored
    with pytest.raises(ValueError, match='read-only'):
        numerical_gradient(f, np.broadcast_to(b, (3, 5)), dout)
