"""Layers as pure functions: `forward(x, weights...) -> (out, cache)`, `backward(dout, cache) -> grads`.

The weights are INPUTS, not owned state, because in SuperNet they are generated:
their gradients flow straight back into the generator. Gradients come back in the
order of the forward's inputs (CS231n style). Layout: activations NHWC, conv
weights HWIO (kh, kw, C_in, C_out), as TensorFlow (and the original SuperNet) use.

Task groups. Every layer also takes a leading group axis G, one weight set per
group (one group = one task's samples and that task's generated weights):
    x (G, N, ..., C), w (G, ..., C, F), b (G, F)
The products then become one batched matmul, so a step that mixes G tasks costs
one kernel call per layer, not G. Without the group axis the shapes are the
usual ones.

Shapes and backward formulas (g = upstream gradient dL/dout):

  dense     out = x @ w + b                  x (N,D) w (D,F) b (F,) -> (N,F)
            dx = g @ w.T    dw = x.T @ g    db = sum_n g
  conv2d    out = im2col(x) @ w.reshape(K,F) + b,   K = kh*kw*C
                                             x (N,H,W,C) -> (N,Ho,Wo,F)
            dw = cols.T @ g     db = sum g     dx = col2im(g @ w.T)
            SAME: Ho = ceil(H/s), TF's split of the padding (extra on the bottom/right)
            VALID: Ho = (H-kh)//s + 1
            How (for speed, same numbers): im2col is one copy of a strided view of the
            padded input, done in cache-sized blocks of images, each padded on its own
            (one block on a GPU);
            dx (and dw when F <= C) comes per stride phase from an im2col of g, which
            is col2im without the (M, K) matrix or its scatter-add. See conv_backward.
  leaky_relu out = max(x, a*x)  (0<=a<1)     dx = g * (1 if x > 0 else a)
  tanh      out = tanh(x)                    dx = g * (1 - out**2)
  sigmoid   out = 1/(1+exp(-x)) (stable)     dx = g * out * (1 - out)
  flatten   out = x.reshape(..., -1)          dx = g.reshape(x.shape)
"""
import numbers
from types import SimpleNamespace

import numpy as np

from .backend import get_xp


# --------------------------------------------------------------------------- dense

def dense_forward(x, w, b):
    """Affine map out = x @ w + b.

    x:   (N, D)       or grouped (G, N, D)
    w:   (D, F)       or grouped (G, D, F)
    b:   (F,)         or grouped (G, F)
    out: (N, F)       or grouped (G, N, F)
    """
    grouped = w.ndim == 3
    if w.ndim not in (2, 3) or x.ndim != w.ndim or b.shape != w.shape[:-2] + w.shape[-1:]:
        raise ValueError(f"dense: shapes x{tuple(x.shape)} w{tuple(w.shape)} b{tuple(b.shape)} "
                         "do not fit; expected x (N,D) w (D,F) b (F,) [or with a leading group axis G]")
    if x.shape[-1] != w.shape[-2]:
        raise ValueError(f"dense: input has {x.shape[-1]} features but the weight expects {w.shape[-2]}")
    if grouped and x.shape[0] != w.shape[0]:
        raise ValueError(f"dense: {x.shape[0]} input groups but {w.shape[0]} weight groups")
    out = x @ w
    out += b[:, None, :] if grouped else b
    return out, (x, w)


def dense_backward(dout, cache):
    """dout: like out -> (dx like x, dw like w, db like b)."""
    x, w = cache
    dx = dout @ w.swapaxes(-1, -2)
    dw = x.swapaxes(-1, -2) @ dout
    db = dout.sum(axis=-2)
    return dx, dw, db


# --------------------------------------------------------------------------- conv

def conv_output_size(size, k, stride, pad):
    """(out, pad_before, pad_after) along one spatial axis."""
    if pad == 'SAME':
        out = -(-size // stride)
        total = max((out - 1) * stride + k - size, 0)
        return out, total // 2, total - total // 2
    if pad == 'VALID':
        lo = hi = 0
    elif isinstance(pad, int):
        lo = hi = pad
    else:
        lo, hi = pad
    out = (size + lo + hi - k) // stride + 1
    if out < 1:
        raise ValueError(f"conv: kernel {k} does not fit an input of size {size} with padding ({lo},{hi})")
    return out, lo, hi


def _pad_hw(pad):
    """pad for both axes: 'SAME' | 'VALID' | int | ((top,bottom),(left,right)), ints >= 0."""
    def bad():                   # built only when raised: this runs on every conv call
        return ValueError(f"conv: padding must be 'SAME', 'VALID', an int >= 0 or ((top, bottom), (left, right)) "
                          f"of ints >= 0, got {pad!r}")

    def count(v):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise bad()
        return int(v)
    if isinstance(pad, str):
        if pad not in ('SAME', 'VALID'):
            raise bad()
        return pad, pad
    if isinstance(pad, numbers.Integral):
        return count(pad), count(pad)
    try:
        (t, b), (l, r) = pad
    except (TypeError, ValueError):
        raise bad() from None
    return (count(t), count(b)), (count(l), count(r))


# im2col works on blocks of images: each block's patch matrix is about this size, so it
# is built and consumed while it is still in cache, and no (N*Ho*Wo, K) matrix is
# allocated in one piece (39 MB for conv1 at batch 512: fresh allocations that large
# are page-faulted in on every step). Each block is freed after use; the first layer's
# dw builds its blocks again (cheaper than keeping 39 MB: results/performance-history.md). One
# block on a GPU. 1 MB since session 9 (2 MB before): with the products cut for OpenBLAS's
# small-matrix kernels (_mm) the step took 0.97-0.99x the time at batch 128 and 256
# (0.98-1.01x at 20 and 8x64; results/small-gemm.txt).
_BLOCK_BYTES = 1 << 20


def _image_blocks(xp, n, bytes_per_image):
    """Slices cutting n images into blocks of about _BLOCK_BYTES (a single block off the CPU)."""
    step = max(1, _BLOCK_BYTES // bytes_per_image if xp is np else n)
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def _pad(xp, a, top, bottom, left, right):
    """a (G, N, H, W, C) with zero rows/columns added around H and W: one copy, and only
    the border is zeroed (zeros + copy would write everything twice)."""
    G, N, H, W, C = a.shape
    out = xp.empty((G, N, top + H + bottom, left + W + right, C), dtype=a.dtype)
    out[:, :, top:top + H, left:left + W] = a
    out[:, :, :top] = 0
    out[:, :, top + H:] = 0
    out[:, :, top:top + H, :left] = 0
    out[:, :, top:top + H, left + W:] = 0
    return out


def _windows(xp, a, kh, kw, Ho, Wo, stride):
    """(..., Ho, Wo, kh, kw, C) strided VIEW of the kh x kw window under each output pixel
    of a (..., Hp, Wp, C): nothing is copied. Reshaping it to (-1, kh*kw*C) makes the
    im2col matrix in one copy, with contiguous runs of kw*C values."""
    *lead, _, _, C = a.shape
    *s_lead, sH, sW, sC = a.strides
    return xp.lib.stride_tricks.as_strided(
        a, shape=(*lead, Ho, Wo, kh, kw, C), strides=(*s_lead, stride * sH, stride * sW, sH, sW, sC))


def _items(a, n):
    """a (..., n) with a contiguous last axis -> (...) of opaque n-value items: the same
    memory, seen by numpy as one element per n values (a numpy-only view)."""
    return a.view(np.dtype((np.void, n * a.itemsize)))[..., 0]


def _fast_copy(xp, a, run):
    """Whether a strided copy of a (..., W, C), whose contiguous runs are `run` values
    long, should go through _items (which needs C and W packed: C values, then pixels).

    numpy copies a strided array one innermost run at a time, at a fixed cost per run.
    For the first layer's im2col, whose runs are kw*C = 15 values, moving the same bytes
    as opaque items, one per kernel row of kw pixels, made conv1's forward + dw 1.15x
    faster (results/performance-history.md, session 7); for runs of 32 values and more
    (the other layers' patch matrices) it did not help, so those stay plain. On a GPU:
    always plain."""
    return (xp is np and run < 32 and a.strides[-1] == a.itemsize
            and a.strides[-2] == a.shape[-1] * a.itemsize)


def _im2col(xp, a, kh, kw, Ho, Wo, stride):
    """a (G, n, Hp, Wp, C) padded -> (G, n*Ho*Wo, kh*kw*C): one row per output pixel,
    columns ordered (kh, kw, C) like an HWIO weight, which so reshapes to (K, F) for free.
    (On the CPU short rows are copied a kernel row of kw pixels at a time: _fast_copy.)"""
    G, n, C = a.shape[0], a.shape[1], a.shape[-1]
    if not _fast_copy(xp, a, kw * C):
        return _windows(xp, a, kh, kw, Ho, Wo, stride).reshape(G, n * Ho * Wo, kh * kw * C)
    pix = _items(a, C)[..., None]                                       # (G, n, Hp, Wp, 1) pixels
    rows = _items(_windows(xp, pix, kh, kw, Ho, Wo, stride)[..., 0], kw)  # (G, n, Ho, Wo, kh) kernel rows
    return np.ascontiguousarray(rows).view(a.dtype).reshape(G, n * Ho * Wo, kh * kw * C)


def _patch_blocks(xp, x, pads, kh, kw, Ho, Wo, stride):
    """Yield (image slice, its im2col block (G, n*Ho*Wo, kh*kw*C)) over cache-sized blocks
    of x (G, N, H, W, C), each block padded by pads = (top, bottom, left, right) on its own,
    so that the padded copy is made in cache and no padded copy of the batch is kept."""
    G, N, C = x.shape[0], x.shape[1], x.shape[-1]
    for blk in _image_blocks(xp, N, G * Ho * Wo * kh * kw * C * x.dtype.itemsize):
        yield blk, _im2col(xp, _pad(xp, x[:, blk], *pads), kh, kw, Ho, Wo, stride)


def conv_forward(x, w, b, stride=1, pad='SAME'):
    """2-D convolution (cross-correlation, as every framework) via im2col + matmul.

    x:   (N, H, W, C)          or grouped (G, N, H, W, C)
    w:   (kh, kw, C, F)        or grouped (G, kh, kw, C, F)
    b:   (F,)                  or grouped (G, F)
    stride: int; pad: 'SAME' | 'VALID' | int | ((top, bottom), (left, right))
    out: (N, Ho, Wo, F)        or grouped (G, N, Ho, Wo, F)
    cache: what conv_backward needs (the input itself, not a copy: change x in place before
           conv_backward and the gradients change; the weights, the geometry)
    """
    xp = get_xp(x, w, b)
    grouped = w.ndim == 5
    if w.ndim not in (4, 5) or x.ndim != w.ndim or b.shape != w.shape[:-4] + w.shape[-1:]:
        raise ValueError(f"conv: shapes x{tuple(x.shape)} w{tuple(w.shape)} b{tuple(b.shape)} do not fit; "
                         "expected x (N,H,W,C) w (kh,kw,C,F) b (F,) [or with a leading group axis G]")
    if x.shape[-1] != w.shape[-2]:
        raise ValueError(f"conv: input has {x.shape[-1]} channels but the weight expects {w.shape[-2]}")
    if grouped and x.shape[0] != w.shape[0]:
        raise ValueError(f"conv: {x.shape[0]} input groups but {w.shape[0]} weight groups")
    if isinstance(stride, bool) or not isinstance(stride, numbers.Integral) or stride < 1:
        raise ValueError(f"conv: stride must be a positive int, got {stride!r}")
    stride = int(stride)
    xg = x if grouped else x[None]
    wg = w if grouped else w[None]
    bg = b if grouped else b[None]
    G, N, H, W, C = xg.shape
    kh, kw, _, F = wg.shape[1:]
    pad_h, pad_w = _pad_hw(pad)
    Ho, pt, pb = conv_output_size(H, kh, stride, pad_h)
    Wo, pl, pr = conv_output_size(W, kw, stride, pad_w)

    K = kh * kw * C
    w2 = wg.reshape(G, K, F)
    b_row = xp.tile(bg, (1, Wo))[:, None, :]            # (G, 1, Wo*F): the bias along an output row
    out = xp.empty((G, N, Ho, Wo, F), dtype=x.dtype)
    for blk, col in _patch_blocks(xp, xg, (pt, pb, pl, pr), kh, kw, Ho, Wo, stride):
        o = out[:, blk].reshape(G, -1, F)                # a view (each group's block is contiguous)
        _mm(xp, col, w2, out=o)
        o_rows = o.reshape(G, -1, Wo * F)                # the same memory, one output row per line:
        o_rows += b_row                                  # the add runs over Wo*F values, not F
    cache = (xg, w2, (kh, kw), (Ho, Wo), (pt, pb, pl, pr), stride, grouped)
    return (out if grouped else out[0]), cache


# OpenBLAS (numpy's BLAS on x86-64 wheels) runs a product with M*N*K <= 1e6 through its
# small-matrix kernels, which skip packing the operands into buffers. Our products are
# narrow (N = 16 channels) and long (M = pixels), where packing costs as much as the
# multiply-adds: cut into row blocks under that size, one call per block (a batched
# matmul over a free reshape), they ran 1.1-1.7x faster (results/small-gemm.txt).
# 0 turns the cutting off (products whole, as other BLAS libraries may prefer).
_SMALL_GEMM_MNK = 1_000_000


def small_product_block(xp, m, k, n):
    """How long a block of the m-long axis of an (m, k) @ (k, n) product (or of the summed
    m axis of an (n, m) @ (m, k) one) may be for OpenBLAS's small-matrix kernels: about
    _SMALL_GEMM_MNK / (k*n), equal blocks where a nearby block count divides m. None: leave
    the product whole (not numpy, cutting off, already small, or so wide that blocks would
    be under 8 long). Columns are cut with it too: small_product_slices."""
    if xp is not np or not _SMALL_GEMM_MNK:
        return None
    r = _SMALL_GEMM_MNK // max(k * n, 1)
    if not 8 <= r < m:
        return None
    for blocks in range(-(-m // r), 2 * -(-m // r) + 1):   # equal blocks if a near count divides m
        if m % blocks == 0:
            return m // blocks
    return r


def small_product_slices(xp, start, stop, k, n):
    """slice(start, stop) of an axis cut as small_product_block says (one slice when the
    product stays whole): the column blocks of nn.optim.LowRank's rows and of supernet's
    generator products."""
    step = small_product_block(xp, stop - start, k, n) or max(stop - start, 1)
    return [slice(c, min(c + step, stop)) for c in range(start, stop, step)]


def _mm(xp, a, b, out=None):
    """a (G, M, K) @ b (G, K, N) -> (G, M, N), the M rows in blocks (small_product_block):
    (G, M/r, r, K) @ (G, 1, K, N) -> (G, M/r, r, N), one BLAS call per block, then the rest.
    Splitting an axis is always a view, so `out` is written in place whatever its strides."""
    G, M, K = a.shape
    N = b.shape[-1]
    r = small_product_block(xp, M, K, N)
    if out is None:
        out = xp.empty((G, M, N), dtype=xp.result_type(a.dtype, b.dtype))
    if r is None:
        return xp.matmul(a, b, out=out)
    q = M // r * r
    xp.matmul(a[:, :q].reshape(G, -1, r, K), b[:, None], out=out[:, :q].reshape(G, -1, r, N))
    if q < M:
        xp.matmul(a[:, q:], b, out=out[:, q:])
    return out


def _mm_tn(xp, a, b):
    """a (G, M, N), b (G, M, K) -> a transposed times b, (G, N, K): the sum over the M rows,
    cut into blocks (small_product_block) whose products are then summed:
    (G, M/r, N, r) @ (G, M/r, r, K) -> (G, M/r, N, K) -> sum over the blocks."""
    G, M, N = a.shape
    K = b.shape[-1]
    r = small_product_block(xp, M, K, N)
    if r is None:
        return a.swapaxes(1, 2) @ b
    q = M // r * r
    out = (a[:, :q].reshape(G, -1, r, N).swapaxes(2, 3) @ b[:, :q].reshape(G, -1, r, K)).sum(axis=1)
    if q < M:
        out += a[:, q:].swapaxes(1, 2) @ b[:, q:]
    return out


def _dw_from_d(C, F):
    """Which way conv_backward gets dw: from the windows of dout when F <= C (they are then
    no bigger than im2col(x)), else from im2col(x), built again block by block."""
    return F <= C


def _phases(size, pad_before, k, s):
    """For each phase p of one axis (padded coordinate % s == p): the first unpadded pixel
    of that phase, how many there are, the phase index of the first one, and how many
    kernel taps (p, p+s, ...) the phase meets."""
    out = []
    for p in range(s):
        first = (p - pad_before) % s
        out.append((first, len(range(first, size, s)), (first + pad_before) // s, len(range(p, k, s))))
    return out


def _conv_grads_by_phase(xp, d, x, wg, pt, pl, stride, need_dx, need_dw):
    """dx and/or dw, split by stride phase, from one im2col of d.

    Input pixel y (padded y + pt) meets only kernel rows i = p + s*a, p = (y + pt) % s, at
    output rows ho = (y + pt) // s - a; likewise for columns. So for the pixels of one
    phase (p, q) the taps w[p::s, q::s] act as a stride-1 correlation with d: `dcol`, an
    im2col of the zero-padded d whose row for pixel (y, x) lists the d values that pixel
    fed (tap order flipped), serves both
        dx[pixels of (p, q)] = dcol @ w[p::s, q::s]          (flipped, as (nA*nB*F, C))
        dw[p::s, q::s]       = x[pixels of (p, q)].T @ dcol   (flipped back)
    No (M, kh*kw*C) dcol, no scatter-add (col2im), and no second im2col of x for dw.
    d (G, N, Ho, Wo, F), x (G, N, H, W, C), wg (G, kh, kw, C, F), pt/pl: x's padding
    above/left -> dx (G, N, H, W, C) or None, dw (G, kh, kw, C, F) or None.
    """
    G, N, Ho, Wo, F = d.shape
    _, kh, kw, C, _ = wg.shape
    H, W = x.shape[2:4]
    s = stride
    rows, cols = _phases(H, pt, kh, s), _phases(W, pl, kw, s)
    # zero-pad d so that every window (phase rows Y0+t-nA+1 .. Y0+t) lies inside it
    top = max([nA - 1 - Y0 for _, _, Y0, nA in rows] + [0])
    bottom = max([Y0 + ny - Ho for _, ny, Y0, _ in rows] + [0])
    left = max([nB - 1 - X0 for _, _, X0, nB in cols] + [0])
    right = max([X0 + nx - Wo for _, nx, X0, _ in cols] + [0])
    dz = _pad(xp, d, top, bottom, left, right)
    dx = xp.empty((G, N, H, W, C), dtype=d.dtype) if need_dx else None
    phases = []                                   # the phases that have pixels and taps
    for p, (y0, ny, Y0, nA) in enumerate(rows):
        for q, (x0, nx, X0, nB) in enumerate(cols):
            if ny == 0 or nx == 0:                # no pixel of this phase: its taps saw only padding
                continue
            if nA == 0 or nB == 0:                # stride > kernel: no tap reaches these pixels
                if need_dx:
                    dx[:, :, y0::s, x0::s] = 0
                continue
            w_ph = wg[:, p::s, q::s][:, ::-1, ::-1]                       # (G, nA, nB, C, F), flipped
            phases.append(SimpleNamespace(
                p=p, q=q, y0=y0, x0=x0, ny=ny, nx=nx, nA=nA, nB=nB,
                w_mat=w_ph.swapaxes(-1, -2).reshape(G, nA * nB * F, C),
                win=dz[:, :, top + Y0 - nA + 1:, left + X0 - nB + 1:],   # window of the first pixel
                x_ph=x[:, :, y0::s, x0::s],                                 # this phase's input pixels
                dw=None))
    # Blocks of images outside, phases inside: a block's d, x and dx are read or written
    # while they are in cache for all the phases, not streamed from memory once per phase
    # (the phases' dcol blocks together about 2 * _BLOCK_BYTES; in session 8 smaller
    # blocks were no faster in the whole step; session 9 halved _BLOCK_BYTES once the
    # products were cut for OpenBLAS's small-matrix kernels). With the blocks padded on
    # their own (_patch_blocks), conv2's backward at batch 512 on one thread took 0.86x
    # session 7's time (28.2 -> 24.0 ms); the step 0.91-0.98x (results/grads-blocks-outer.txt).
    dcol_bytes = sum(ph.ny * ph.nx * ph.nA * ph.nB for ph in phases) * G * F * d.dtype.itemsize
    for blk in _image_blocks(xp, N, max(1, dcol_bytes // 2)):
        for ph in phases:
            dcol = _im2col(xp, ph.win[:, blk], ph.nA, ph.nB, ph.ny, ph.nx, 1)   # (G, n*ny*nx, nA*nB*F)
            if need_dx:
                dx[:, blk, ph.y0::s, ph.x0::s] = _mm(xp, dcol, ph.w_mat).reshape(G, -1, ph.ny, ph.nx, C)
            if need_dw:
                part = _mm_tn(xp, ph.x_ph[:, blk].reshape(G, -1, C), dcol)      # (G, C, nA*nB*F)
                ph.dw = part if ph.dw is None else ph.dw + part
    dw = None
    if need_dw:
        dw = xp.zeros((G, kh, kw, C, F), dtype=d.dtype)
        for ph in (ph for ph in phases if ph.dw is not None):       # None: no images
            dw[:, ph.p::s, ph.q::s] = ph.dw.reshape(G, C, ph.nA, ph.nB, F).transpose(0, 2, 3, 1, 4)[:, ::-1, ::-1]
    return dx, dw


def conv_backward(dout, cache, need_dx=True):
    """dout: like out -> (dx like x, dw like w, db like b).

    db = sum of dout. dx (and dw when F <= C) by _conv_grads_by_phase; otherwise (the
    first layer, C=3 < F=16) dw = im2col(x).T @ dout over im2col blocks built again here,
    each used while it is in cache. Which dw method runs depends only on the shapes, so
    need_dx does not change dw.
    need_dx=False skips the input gradient (returns dx=None): the first layer's input is
    the image, which needs none.
    """
    x, w2, (kh, kw), (Ho, Wo), pads, stride, grouped = cache
    xp = get_xp(dout, x)
    G, N, C = x.shape[0], x.shape[1], x.shape[-1]
    F = w2.shape[2]
    want = (G, N, Ho, Wo, F) if grouped else (N, Ho, Wo, F)
    if tuple(dout.shape) != want:
        raise ValueError(f"conv_backward: dout {tuple(dout.shape)} should be the forward's output shape {want}")
    d = dout.reshape(G, N, Ho, Wo, F)
    ones = xp.ones((G, 1, N * Ho * Wo), dtype=d.dtype)
    db = (ones @ d.reshape(G, -1, F))[:, 0]              # (G, F): a gemv; sum(axis=1) is 20x slower
    dw_from_d = _dw_from_d(C, F)
    dx = dw = None
    if need_dx or dw_from_d:
        dx, dw = _conv_grads_by_phase(xp, d, x, w2.reshape(G, kh, kw, C, F), pads[0], pads[2], stride,
                                      need_dx, dw_from_d)
    if not dw_from_d:
        for blk, col in _patch_blocks(xp, x, pads, kh, kw, Ho, Wo, stride):
            part = _mm_tn(xp, d[:, blk].reshape(G, -1, F), col)       # (G, F, K): dw transposed,
            dw = part if dw is None else dw + part       # faster than col.T @ d; summed over the blocks
        if dw is None:                                   # no images
            dw = xp.zeros((G, F, kh * kw * C), dtype=d.dtype)
        dw = dw.swapaxes(1, 2).reshape(G, kh, kw, C, F)
    if not grouped:
        dx = None if dx is None else dx[0]
        dw, db = dw[0], db[0]
    return dx, dw, db


# --------------------------------------------------------------------------- activations

def leaky_relu_forward(x, alpha=0.2):
    """out = max(x, alpha*x) for 0 <= alpha < 1.  x: any shape -> out: same shape."""
    if not 0 <= alpha < 1:
        raise ValueError(f"leaky_relu: alpha must be in [0, 1), got {alpha}")
    out = alpha * x
    get_xp(x).maximum(out, x, out=out)
    return out, (x, alpha)


def leaky_relu_backward(dout, cache):
    """dx = dout where x > 0, alpha * dout elsewhere, as dout * slope.
    (No xp.where: numpy's where branches per element, ~10x slower on random signs.)"""
    x, alpha = cache
    xp = get_xp(dout, x)
    slope = xp.empty(x.shape, dtype=dout.dtype)
    xp.greater(x, 0, out=slope)         # 1 or 0
    slope *= 1 - alpha
    slope += alpha                      # 1 or alpha
    slope *= dout
    return slope


def tanh_forward(x):
    """out = tanh(x). x: any shape -> out: same shape."""
    out = get_xp(x).tanh(x)
    return out, out


def tanh_backward(dout, cache):
    """dx = dout * (1 - tanh(x)**2), from the saved output."""
    out = cache
    return dout * (1 - out * out)


def sigmoid(x):
    """Numerically stable logistic function: never exp of a large positive number."""
    xp = get_xp(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


def sigmoid_forward(x):
    """out = 1 / (1 + exp(-x)). x: any shape -> out: same shape."""
    out = sigmoid(x)
    return out, out


def sigmoid_backward(dout, cache):
    """dx = dout * out * (1 - out)."""
    out = cache
    return dout * out * (1 - out)


def flatten_forward(x, keep=1):
    """Keep the first `keep` axes, flatten the rest. (N, H, W, C) -> (N, H*W*C)."""
    return x.reshape(x.shape[:keep] + (-1,)), x.shape


def flatten_backward(dout, cache):
    """dx = dout reshaped to the input's shape."""
    return dout.reshape(cache)
