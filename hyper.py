"""A static HyperNetwork (Ha, Dai & Le, "HyperNetworks", 2016), made task-conditional,
as a drop-in replacement for SuperNet's generator. Every backward is written by hand.

Ha et al. generate a conv kernel in chunks. The basic chunk is a kernel
K (f, f, N_in, N_out) with N_in = N_out = `chunk` (16). Each chunk j has an embedding
z_j (N_z,). Two linear layers, shared by all chunks, map it to the chunk:

    a_i = W_in[i] @ z_j + B_in[i]          i = 1..N_in          a_i (d,)
    K_i = a_i @ W_out + B_out                                   K_i (f*f*N_out,) -> (f, f, N_out)
    K   = concat_i K_i along the input-channel axis             (f, f, N_in, N_out)

(the paper writes K_i = <W_out, a_i> + B_out with W_out (f*f*N_out) x d; here W_out is stored
transposed, (d, f*f*N_out), so that K_i = a_i @ W_out). The paper has no output nonlinearity
('linear': HyperConfig's and the command line's default); 'tanh' (K = tanh(...)) is offered
as an option. Through the API, hyper_config takes it from supernet.Config.gen_output, whose
default is 'tanh' (the dense generator's): pass gen_output='linear' for the paper's.

Task conditioning (our addition). The chunk embedding depends on the task vector z_task:

    z_j = c_j + A @ z_task                 c_j (N_z,) per-chunk code, A (N_z, z_dim) shared

so the task enters only through z_task, and z-only adaptation (learn one z_task, everything
else frozen) works exactly as with the SuperNet generator.

Tiling. A conv kernel (f, f, C_in, C_out) is covered by ceil(C_in/chunk) x ceil(C_out/chunk)
chunks, each with its own code c_j; tile (p, q) fills input channels p*chunk.. and output
channels q*chunk.. . The tiled kernel is then cropped to its first C_in input and first C_out
output channels: conv1 of the original classifier (C_in = 3) is one chunk of which only the
first 3 input channels are used (the other 13 are generated and discarded; they get zero
gradient). All conv layers share W_in, B_in, W_out, B_out (one kernel size, cfg.kernel).

What is generated. Only conv kernels, as in Ha et al. (their static hypernetwork
generates conv kernels; the other layers are ordinary weights), but here every conv kernel,
conv1's included (their MNIST example generates only the second conv layer's). The fc weights and every
bias are ordinary task-independent parameters ('gen.shared.fc1.w', 'gen.shared.conv1.b', ...,
named after the classifier tensor): trained in phase 1 like the hypernetwork, frozen in z-only adaptation.
The fc weights do not tile into f x f x 16 x 16 chunks, and the biases are tiny.

Output contract (as supernet.generator_forward / generator_backward, so everything downstream
is reused): theta (G, P) rows laid out by supernet.classifier_layout(cfg); the conv parts are
generated per task, the shared parts are the same parameters broadcast to every row. Backward:
dtheta (G, P) -> dZ (G, z_dim) and the parameter gradients; the gradient of a shared tensor is
the sum over the G rows of its dtheta columns.

Parameters (keys, shapes; n = number of chunks, Nz = hcfg.nz, c = hcfg.chunk, f = cfg.kernel):
    'gen.hyp.codes' (n, Nz)   'gen.hyp.A' (Nz, z_dim)
    'gen.hyp.W_in'  (c, d, Nz) 'gen.hyp.B_in' (c, d)
    'gen.hyp.W_out' (d, f*f*c) 'gen.hyp.B_out' (f*f*c,)
    'gen.shared.<tensor>' for every non-conv-kernel classifier tensor (conv biases, fc, out)
    'z' (n_tasks, z_dim) task vectors (hyper_init_params), as in SuperNet.
"""
from dataclasses import dataclass

import numpy as np

import supernet as S
from nn import layers as L
from nn.backend import get_xp, to_device
from nn.loss import sigmoid_cross_entropy


# =========================================================================== config

@dataclass
class HyperConfig(S.DictConfig):
    """The hypernetwork's sizes: chunk embedding N_z, hidden width d, chunk size N_in = N_out."""
    nz: int = 64
    d: int = 64
    chunk: int = 16
    output: str = 'linear'            # 'linear' (the paper) or 'tanh'

    def __post_init__(self):
        if self.output not in ('linear', 'tanh'):
            raise ValueError(f"HyperConfig.output must be 'linear' or 'tanh', got {self.output!r}")
        for k in ('nz', 'd', 'chunk'):
            v = getattr(self, k)
            if isinstance(v, bool) or not float(v).is_integer() or int(v) < 1:
                raise ValueError(f"HyperConfig.{k} must be an integer >= 1, got {v!r}")
            setattr(self, k, int(v))



# =========================================================================== layout

def conv_tiles(cfg, hcfg):
    """([(name, shape, first_chunk, n_in_tiles, n_out_tiles)] of the generated conv kernels,
    total number of chunks n). The chunks of one kernel are consecutive, tile (p, q) at
    first_chunk + p * n_out_tiles + q."""
    tiles, n, c = [], 0, hcfg.chunk
    for name, shape in S.classifier_shapes(cfg):
        if len(shape) == 4:
            ti, to = -(-shape[2] // c), -(-shape[3] // c)
            tiles.append((name, shape, n, ti, to))
            n += ti * to
    if not tiles:
        raise ValueError("the hypernetwork generates conv kernels, and this classifier has no conv layer")
    return tiles, n


def shared_names(cfg):
    """The classifier tensors that are ordinary shared parameters (all but the conv kernels)."""
    return [name for name, shape in S.classifier_shapes(cfg) if len(shape) != 4]


def hyper_shapes(cfg, hcfg):
    """{parameter key: shape} of the hypernetwork (without 'z')."""
    _, n = conv_tiles(cfg, hcfg)
    c, f = hcfg.chunk, cfg.kernel
    shapes = {'gen.hyp.codes': (n, hcfg.nz), 'gen.hyp.A': (hcfg.nz, cfg.z_dim),
              'gen.hyp.W_in': (c, hcfg.d, hcfg.nz), 'gen.hyp.B_in': (c, hcfg.d),
              'gen.hyp.W_out': (hcfg.d, f * f * c), 'gen.hyp.B_out': (f * f * c,)}
    shape_of = dict(S.classifier_shapes(cfg))
    shapes.update({f'gen.shared.{name}': shape_of[name] for name in shared_names(cfg)})
    return shapes


def hyper_count(cfg, hcfg):
    """Number of hypernetwork parameters (without the task vectors z), from the shapes."""
    return int(sum(np.prod(s) for s in hyper_shapes(cfg, hcfg).values()))


# =========================================================================== init

def hyper_init(cfg, hcfg, rng, dtype=np.float32):
    """Hypernetwork parameters (host numpy), scaled so the generated kernels have the
    variance of the classifier's Glorot-uniform init:

      c_j ~ N(0, 1/2), A ~ N(0, 1/2)   -> z_j = c_j + A @ z_task has unit-variance entries
                                          for a one-hot z_task (the default z init)
      W_in ~ N(0, 1/N_z), B_in = 0     -> a has unit-variance entries
      W_out ~ U(+-lim / sqrt(d)), B_out = 0, lim = sqrt(6 / (f*f*(N_in + N_out)))
                                       -> Var K = d * Var a * Var W_out = lim**2 / 3,
                                          the variance of Glorot-uniform on one chunk
                                          (f, f, 16, 16); e.g. std 0.050 for 5x5 kernels.
    (The variance is matched, not the distribution: K is a sum of d products, ~Gaussian.)
    Shared tensors: the classifier's own init (supernet.init_classifier: Glorot-uniform
    weights, zero biases).
    """
    shapes = hyper_shapes(cfg, hcfg)
    nz, d, c, f = hcfg.nz, hcfg.d, hcfg.chunk, cfg.kernel
    lim = np.sqrt(6.0 / (f * f * (c + c)))
    p = {'gen.hyp.codes': rng.normal(0, np.sqrt(0.5), size=shapes['gen.hyp.codes']),
         'gen.hyp.A': rng.normal(0, np.sqrt(0.5), size=shapes['gen.hyp.A']),
         'gen.hyp.W_in': rng.normal(0, 1 / np.sqrt(nz), size=shapes['gen.hyp.W_in']),
         'gen.hyp.B_in': np.zeros(shapes['gen.hyp.B_in']),
         'gen.hyp.W_out': rng.uniform(-1, 1, size=shapes['gen.hyp.W_out']) * lim / np.sqrt(d),
         'gen.hyp.B_out': np.zeros(shapes['gen.hyp.B_out'])}
    base = S.init_classifier(cfg, rng, dtype=np.float64)
    p.update({f'gen.shared.{name}': base[name] for name in shared_names(cfg)})
    return {k: np.ascontiguousarray(v, dtype=dtype) for k, v in p.items()}


def hyper_init_params(cfg, hcfg, seed=0, xp=np, dtype=np.float32):
    """Hypernetwork + task vectors 'z' (cfg.z_init), created on the device of `xp`
    (the counterpart of supernet.init_params)."""
    rng = np.random.default_rng(seed)
    params = hyper_init(cfg, hcfg, rng, dtype)
    params['z'] = S.init_z(cfg, rng, dtype=dtype)
    return {k: to_device(v, xp) for k, v in params.items()}


# =========================================================================== the three stages

def embed_forward(Z, codes, A):
    """Chunk embeddings z_j = c_j + A @ z_task, for every task in the batch and every chunk.

    Z:     (G, z_dim)   task vectors
    codes: (n, Nz)      per-chunk codes c_j
    A:     (Nz, z_dim)  shared task projection
    zc:    (G, n, Nz)
    """
    u = Z @ A.T                                   # (G, Nz)   A @ z_task, one row per task
    zc = codes[None, :, :] + u[:, None, :]        # (G, n, Nz)
    return zc, (Z, A)


def embed_backward(dzc, cache):
    """dzc (G, n, Nz) -> dZ (G, z_dim), dcodes (n, Nz), dA (Nz, z_dim)."""
    Z, A = cache
    du = dzc.sum(axis=1)                          # (G, Nz)
    dZ = du @ A                                   # (G, z_dim)
    dcodes = dzc.sum(axis=0)                      # (n, Nz)
    dA = du.T @ Z                                 # (Nz, z_dim)
    return dZ, dcodes, dA


def hyper_layers_forward(zc, W_in, B_in, W_out, B_out, output='linear'):
    """Ha et al.'s two linear layers, shared by every chunk (R = number of chunk embeddings).

    zc:    (R, Nz)                 chunk embeddings
    W_in:  (N_in, d, Nz)           B_in:  (N_in, d)
    a:     (R, N_in, d)            a_i = W_in[i] @ z + B_in[i], i = 1..N_in
    W_out: (d, f*f*N_out)          B_out: (f*f*N_out,)
    K:     (R, N_in, f*f*N_out)    K_i = a_i @ W_out + B_out  (tanh of it if output='tanh')
    """
    R, nz = zc.shape
    n_in, d, _ = W_in.shape
    W_in2 = W_in.reshape(n_in * d, nz)            # all N_in first layers as one matrix
    a = zc @ W_in2.T + B_in.reshape(-1)           # (R, N_in*d)
    a2 = a.reshape(R * n_in, d)                   # one row per (chunk, input channel)
    K = a2 @ W_out + B_out                        # (R*N_in, f*f*N_out)
    c_tanh = None
    if output == 'tanh':
        K, c_tanh = L.tanh_forward(K)
    return K.reshape(R, n_in, -1), (zc, W_in2, a2, W_out, c_tanh, (R, n_in, d, nz))


def hyper_layers_backward(dK, cache, need_param_grads=True):
    """dK (R, N_in, f*f*N_out) -> (dzc (R, Nz), dW_in, dB_in, dW_out, dB_out) in the order of
    the forward's inputs; the four parameter gradients are None if not need_param_grads."""
    zc, W_in2, a2, W_out, c_tanh, (R, n_in, d, nz) = cache
    dK = dK.reshape(R * n_in, -1)
    dpre = L.tanh_backward(dK, c_tanh) if c_tanh is not None else dK    # (R*N_in, f*f*N_out)
    da2 = dpre @ W_out.T                          # (R*N_in, d)
    da = da2.reshape(R, n_in * d)
    dzc = da @ W_in2                              # (R, Nz)
    if not need_param_grads:
        return dzc, None, None, None, None
    dW_out = a2.T @ dpre                          # (d, f*f*N_out)
    dB_out = dpre.sum(axis=0)                     # (f*f*N_out,)
    dW_in = (da.T @ zc).reshape(n_in, d, nz)      # (N_in, d, Nz)
    dB_in = da.sum(axis=0).reshape(n_in, d)       # (N_in, d)
    return dzc, dW_in, dB_in, dW_out, dB_out


# Axes of one kernel's chunks: (G, ti, to, i, fh, fw, o) <-> the kernel (G, fh, fw, ti, i, to, o).
_TO_KERNEL = (0, 4, 5, 1, 3, 2, 6)
_TO_CHUNKS = (0, 3, 5, 4, 1, 2, 6)               # the inverse permutation


def assemble_forward(K, tiles, f, c):
    """Chunks -> conv kernels: tile, then crop to the kernel's channel counts.

    K:       (G, n, N_in, f*f*N_out)   every chunk's K_i (N_in = N_out = c)
    tiles:   conv_tiles(cfg, hcfg)[0]
    kernels: {name: (G, f, f, C_in, C_out)}   input channel p*c + i, output channel q*c + o
             taken from tile (p, q)'s K_i[fh, fw, o]
    """
    G = K.shape[0]
    kernels = {}
    for name, (_, _, C_in, C_out), j0, ti, to in tiles:
        k = K[:, j0:j0 + ti * to].reshape(G, ti, to, c, f, f, c)         # (G, ti, to, i, fh, fw, o)
        k = k.transpose(_TO_KERNEL).reshape(G, f, f, ti * c, to * c)      # (G, fh, fw, C_in', C_out')
        kernels[name] = k[..., :C_in, :C_out]
    return kernels


def assemble_backward(dkernels, tiles, f, c, xp, dtype):
    """{name: (G, f, f, C_in, C_out)} -> dK (G, n, N_in, f*f*N_out); the cropped-away
    channels get zero gradient."""
    G = next(iter(dkernels.values())).shape[0]
    n = tiles[-1][2] + tiles[-1][3] * tiles[-1][4]
    dK = xp.zeros((G, n, c, f * f * c), dtype=dtype)
    for name, (_, _, C_in, C_out), j0, ti, to in tiles:
        dk = xp.zeros((G, f, f, ti * c, to * c), dtype=dtype)
        dk[..., :C_in, :C_out] = dkernels[name]
        dk = dk.reshape(G, f, f, ti, c, to, c).transpose(_TO_CHUNKS)     # (G, ti, to, i, fh, fw, o)
        dK[:, j0:j0 + ti * to] = dk.reshape(G, ti * to, c, f * f * c)
    return dK


# =========================================================================== generator contract

def hyper_forward(Z, params, cfg, hcfg):
    """Z (G, z_dim) -> theta (G, P), cache: every classifier tensor for each of the G task
    vectors, rows laid out by supernet.classifier_layout(cfg) (conv kernels generated per
    task, the other tensors the shared parameters, the same in every row)."""
    xp = get_xp(Z, params['gen.hyp.W_out'])
    tiles, n = conv_tiles(cfg, hcfg)
    layout, P = S.classifier_layout(cfg)
    G, c, f = Z.shape[0], hcfg.chunk, cfg.kernel
    zc, c_embed = embed_forward(Z, params['gen.hyp.codes'], params['gen.hyp.A'])        # (G, n, Nz)
    K, c_layers = hyper_layers_forward(zc.reshape(G * n, hcfg.nz), params['gen.hyp.W_in'],
                                       params['gen.hyp.B_in'], params['gen.hyp.W_out'],
                                       params['gen.hyp.B_out'], hcfg.output)              # (G*n, N_in, f*f*c)
    kernels = assemble_forward(K.reshape(G, n, c, f * f * c), tiles, f, c)
    theta = xp.empty((G, P), dtype=K.dtype)
    for name, k in kernels.items():
        off, size, _ = layout[name]
        theta[:, off:off + size] = k.reshape(G, size)
    for name in shared_names(cfg):
        off, size, _ = layout[name]
        theta[:, off:off + size] = params[f'gen.shared.{name}'].reshape(1, size)
    return theta, (c_embed, c_layers, tiles, layout, cfg, hcfg, G, n)


def hyper_backward(dtheta, cache, need_param_grads=True):
    """dtheta (G, P) -> (dZ (G, z_dim), {'gen.*' key: grad}).

    need_param_grads=False (z-only training, hypernetwork frozen) returns (dZ, {}), skipping
    the parameter gradients, as supernet.generator_backward does.
    """
    c_embed, c_layers, tiles, layout, cfg, hcfg, G, n = cache
    xp = get_xp(dtheta)
    c, f = hcfg.chunk, cfg.kernel
    dkernels = {}
    for name, (_, _, C_in, C_out), _, _, _ in tiles:
        off, size, _ = layout[name]
        dkernels[name] = dtheta[:, off:off + size].reshape(G, f, f, C_in, C_out)
    dK = assemble_backward(dkernels, tiles, f, c, xp, dtheta.dtype)                     # (G, n, c, f*f*c)
    dzc, dW_in, dB_in, dW_out, dB_out = hyper_layers_backward(dK.reshape(G * n, c, f * f * c),
                                                              c_layers, need_param_grads)
    dZ, dcodes, dA = embed_backward(dzc.reshape(G, n, hcfg.nz), c_embed)
    grads = {}
    if need_param_grads:
        grads.update({'gen.hyp.codes': dcodes, 'gen.hyp.A': dA, 'gen.hyp.W_in': dW_in,
                      'gen.hyp.B_in': dB_in, 'gen.hyp.W_out': dW_out, 'gen.hyp.B_out': dB_out})
        for name in shared_names(cfg):
            off, size, shape = layout[name]
            grads[f'gen.shared.{name}'] = dtheta[:, off:off + size].sum(axis=0).reshape(shape)
    return dZ, grads


# =========================================================================== loss

def as_supernet_config(cfg, hcfg):
    """The supernet.Config that selects this hypernetwork (generator='hyper'), so that
    supernet.loss_and_grads / forward_from_z / train.supernet_logits_fn run it."""
    return S.Config.from_dict({**cfg.to_dict(), 'generator': 'hyper', 'hyper_nz': hcfg.nz,
                               'hyper_d': hcfg.d, 'hyper_chunk': hcfg.chunk, 'gen_output': hcfg.output})


def hyper_loss_and_grads(params, x, y, tasks, cfg, hcfg, need_gen_grads=True, Z=None):
    """One step's loss and every gradient, by hand: supernet.loss_and_grads with this
    hypernetwork as the generator (same arguments and returns: loss, grads incl. 'z', logits)."""
    return S.loss_and_grads(params, x, y, tasks, as_supernet_config(cfg, hcfg),
                            need_gen_grads=need_gen_grads, Z=Z)


def hyper_loss(params, x, y, tasks, cfg, hcfg):
    """The loss alone (forward only; for finite differences)."""
    Z = params['z'][to_device(np.asarray(tasks, dtype=np.int64), get_xp(x))]
    return sigmoid_cross_entropy(S.forward_from_z(params, Z, x, as_supernet_config(cfg, hcfg)), y)[0]


def hyper_logits_fn(params, cfg, hcfg, z):
    """Logits under the classifier generated from one task vector z (z_dim,), for
    train.evaluate: train.supernet_logits_fn with this hypernetwork as the generator."""
    import train
    return train.supernet_logits_fn(params, as_supernet_config(cfg, hcfg), z)


# =========================================================================== gradient check

def hyper_gradient_check(cfg, hcfg, tasks, m=3, n_samples=100, seed=0, w_out_scale=1.0, keys=None):
    """hyper_loss_and_grads against centred finite differences in float64.

    Non-trivial inputs: random (not one-hot) z ~ N(0, 1/z_dim), random non-zero biases B_in, B_out and shared
    biases, random images and labels; w_out_scale enlarges the generated kernels (for 'tanh',
    so that it is neither saturated nor linear). The batch holds m images of each task.
    keys: the parameters to check (default all).
    Returns {parameter key: the largest rel_error of its groups}: n_samples random coordinates
    (all if None), grouped as supernet's gradient_check does (S._gradcheck_groups: z in the
    batch's rows and, fewer, in the others). z's other rows' gradient must be exactly 0 (all
    of them); a group whose sampled numerical gradient is zero raises (it would prove nothing).
    """
    r = np.random.default_rng(seed)
    p = hyper_init_params(cfg, hcfg, seed=seed, dtype=np.float64)
    p['z'] = r.normal(0, 1 / np.sqrt(cfg.z_dim), size=p['z'].shape)
    p['gen.hyp.B_in'] = r.normal(0, 0.3, size=p['gen.hyp.B_in'].shape)
    p['gen.hyp.B_out'] = r.normal(0, 0.05, size=p['gen.hyp.B_out'].shape) * w_out_scale
    p['gen.hyp.W_out'] = p['gen.hyp.W_out'] * w_out_scale
    for k in p:
        if k.startswith('gen.') and k.endswith('.b'):
            p[k] = r.normal(0, 0.1, size=p[k].shape)
    x = r.normal(size=(len(tasks), m) + cfg.image_shape)
    y = (r.random((len(tasks), m)) > 0.5).astype(np.float64)
    loss, grads, _ = hyper_loss_and_grads(p, x, y, tasks, cfg, hcfg)
    if not 0.05 < float(loss) < 5:
        raise ValueError(f"gradient check: loss {float(loss):.3g}: the classifier saturates and the "
                         "check would be vacuous; lower w_out_scale")
    f = lambda: hyper_loss(p, x, y, tasks, cfg, hcfg)
    if np.any(np.delete(grads['z'], tasks, axis=0) != 0):
        raise RuntimeError("gradient check: z rows of tasks outside the batch got a non-zero gradient")
    groups = S._gradcheck_groups(cfg, p, tasks, n_samples, np.random.default_rng(seed))
    return S._check_groups(f, p, grads, {k: groups[k] for k in (keys or p)}, 'hyper gradient check')
