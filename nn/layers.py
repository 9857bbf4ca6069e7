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
  leaky_relu out = max(x, a*x)  (0<=a<1)     dx = g * (1 if x > 0 else a)
  tanh      out = tanh(x)                    dx = g * (1 - out**2)
  sigmoid   out = 1/(1+exp(-x)) (stable)     dx = g * out * (1 - out)
  flatten   out = x.reshape(..., -1)          dx = g.reshape(x.shape)
"""
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
    """pad for both axes: 'SAME' | 'VALID' | int | ((top,bottom),(left,right))."""
    if isinstance(pad, str):
        if pad not in ('SAME', 'VALID'):
            raise ValueError(f"conv: padding must be 'SAME', 'VALID', an int or ((t,b),(l,r)), got {pad!r}")
        return pad, pad
    if isinstance(pad, int):
        return pad, pad
    return tuple(pad[0]), tuple(pad[1])


def conv_forward(x, w, b, stride=1, pad='SAME'):
    """2-D convolution (cross-correlation, as every framework) via im2col + one matmul.

    x:   (N, H, W, C)          or grouped (G, N, H, W, C)
    w:   (kh, kw, C, F)        or grouped (G, kh, kw, C, F)
    b:   (F,)                  or grouped (G, F)
    stride: int; pad: 'SAME' | 'VALID' | int | ((top, bottom), (left, right))
    out: (N, Ho, Wo, F)        or grouped (G, N, Ho, Wo, F)
    cache: what conv_backward needs (the im2col matrix, the weights, the geometry)
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
    if not (isinstance(stride, int) and stride >= 1):
        raise ValueError(f"conv: stride must be a positive int, got {stride!r}")
    xg = x if grouped else x[None]
    wg = w if grouped else w[None]
    bg = b if grouped else b[None]
    G, N, H, W, C = xg.shape
    kh, kw, _, F = wg.shape[1:]
    pad_h, pad_w = _pad_hw(pad)
    Ho, pt, pb = conv_output_size(H, kh, stride, pad_h)
    Wo, pl, pr = conv_output_size(W, kw, stride, pad_w)

    x4 = xg.reshape(G * N, H, W, C)
    if pt or pb or pl or pr:
        xpad = xp.zeros((G * N, H + pt + pb, W + pl + pr, C), dtype=x.dtype)
        xpad[:, pt:pt + H, pl:pl + W, :] = x4
    else:
        xpad = x4
    # im2col: one strided slice per kernel offset (Chainer's loop), never per pixel.
    col = xp.empty((G * N, Ho, Wo, kh, kw, C), dtype=x.dtype)
    he, we = stride * (Ho - 1) + 1, stride * (Wo - 1) + 1
    for i in range(kh):
        for j in range(kw):
            col[:, :, :, i, j, :] = xpad[:, i:i + he:stride, j:j + we:stride, :]
    K = kh * kw * C
    col = col.reshape(G, N * Ho * Wo, K)
    w2 = wg.reshape(G, K, F)
    out = col @ w2
    out += bg[:, None, :]
    out = out.reshape(G, N, Ho, Wo, F)
    cache = (col, w2, (G, N, H, W, C), (kh, kw, F), (Ho, Wo), (pt, pb, pl, pr), stride, grouped)
    return (out if grouped else out[0]), cache


def conv_backward(dout, cache, need_dx=True):
    """dout: like out -> (dx like x, dw like w, db like b).

    need_dx=False skips the input gradient (returns dx=None): the first layer's
    input is the image, whose gradient nobody needs.
    """
    col, w2, (G, N, H, W, C), (kh, kw, F), (Ho, Wo), (pt, pb, pl, pr), stride, grouped = cache
    xp = get_xp(dout, col)
    d2 = dout.reshape(G, N * Ho * Wo, F)
    db = d2.sum(axis=1)                                  # (G, F)
    dw = (col.swapaxes(1, 2) @ d2).reshape(G, kh, kw, C, F)
    dx = None
    if need_dx:
        dcol = (d2 @ w2.swapaxes(1, 2)).reshape(G * N, Ho, Wo, kh, kw, C)
        dxpad = xp.zeros((G * N, H + pt + pb, W + pl + pr, C), dtype=dout.dtype)
        he, we = stride * (Ho - 1) + 1, stride * (Wo - 1) + 1
        for i in range(kh):           # col2im: scatter-add each kernel offset back
            for j in range(kw):
                dxpad[:, i:i + he:stride, j:j + we:stride, :] += dcol[:, :, :, i, j, :]
        dx = dxpad[:, pt:pt + H, pl:pl + W, :].reshape(G, N, H, W, C)
        if not grouped:
            dx = dx[0]
    if not grouped:
        dw, db = dw[0], db[0]
    return dx, dw, db


# --------------------------------------------------------------------------- activations

def leaky_relu_forward(x, alpha=0.2):
    """out = max(x, alpha*x) for 0 <= alpha < 1.  x: any shape -> out: same shape."""
    if not 0 <= alpha < 1:
        raise ValueError(f"leaky_relu: alpha must be in [0, 1), got {alpha}")
    xp = get_xp(x)
    return xp.maximum(x, alpha * x), (x, alpha)


def leaky_relu_backward(dout, cache):
    """dx = dout where x > 0, alpha * dout elsewhere."""
    x, alpha = cache
    xp = get_xp(dout, x)
    return xp.where(x > 0, dout, alpha * dout)


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
