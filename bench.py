#!/usr/bin/env python3
"""Benchmark of the SuperNet training step (issue 6).

One run measures and prints:
  * the machine: float32 matmul peak (GFLOP/s), the same for products shaped like our
    convolutions' (a block of conv2's patch matrix times its 400 x 16 weight), and copy
    bandwidth (GB/s copied);
  * the full training step, supernet.loss_and_grads + Optimizer('rmsprop').step over every
    parameter, original Config(n_tasks=98), at batch 20, 128, 512 (one task per step) and a
    mixed step of 8 tasks x 64: ms/step (median after warm-up), images/s, achieved GFLOP/s
    (FLOPs counted analytically) and its fraction of the matmul peak;
  * one mixed 8x64 step against 8 one-task steps of 64 images (the same 512 images);
  * a per-part breakdown (generator, each conv forward/backward, activations, optimizer),
    timed by wrapping the functions the real step calls (no copy of the step), on one
    thread, so each part's time is its CPU work;
  * the step's peak memory: numpy allocations (tracemalloc) or, on a GPU, what the CuPy
    memory pool holds after one step from empty; the peak RSS of the process and its
    classifier worker processes;
  * --vs-torch: PyTorch's conv layers alone on one thread, beside our breakdown;
  * --vs-torch: the same step in PyTorch, timed side by side (interleaved in short runs,
    the first call of each run discarded, so that neither library's thread pool spinning
    down slows the other), the speed ratio torch_ms / our_ms (>= 1: we are faster), and a
    float64 check that both compute the same loss and gradients (an oracle for the
    hand-written backward independent of finite differences). torch is imported only under
    this option; it is not a dependency.

--threads N (default: every usable CPU) is the thread count of both: ours
(nn.backend.set_num_threads, BLAS on one thread) and PyTorch's (torch.set_num_threads).
The ceilings are measured with N threads too.

    python3 bench.py [--quick] [--threads N] [--device cpu|gpu] [--vs-torch] [--json PATH]
"""
import os
import sys


# Our threads split the work themselves; BLAS runs on one thread. Its count is read when
# numpy is first imported, so set it before that import (set_num_threads also sets it at
# run time, where it can find OpenBLAS).
if __name__ == '__main__':
    for _var in ('OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
        os.environ[_var] = '1'

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import numpy as np  # noqa: E402

import supernet as S  # noqa: E402
from data import int_at_least  # noqa: E402
from nn import layers as L  # noqa: E402
from nn.backend import (get_device_module, get_num_threads, get_shard_workers, parallel_map,  # noqa: E402
                        set_num_threads, set_shard_workers, split_range, synchronize, threads_error,
                        to_device, to_host)
from nn.gradcheck import rel_error  # noqa: E402
from nn.optim import Optimizer  # noqa: E402
from train import peak_rss_mb  # noqa: E402


N_TASKS = 98            # Config(n_tasks=98), the original SuperNet: at most this many tasks in a step


# =========================================================================== timing

def timed(fn, sync):
    """Seconds of one call of fn, with the device drained before and after."""
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def median_ms(fns, sync, warmup, repeats, run=1):
    """Median ms of each function of fns, called in turn (interleaved, so that a load that
    comes and goes on a shared machine hits all of them alike) after `warmup` rounds.
    run > 1: each turn calls the function `run` times and keeps all but the first (a
    library's thread pool may still be spinning from the previous turn)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns):
            laps = [timed(fn, sync) for _ in range(run)]
            t.extend(laps[1:] if run > 1 else laps)
    return [1e3 * float(np.median(t)) for t in times]


def machine_peaks(xp, quick):
    """float32 matmul GFLOP/s (best of a few n x n products, one per thread at once); the
    same for the products our convolutions make (conv2's: a block of its patch matrix,
    rows x 400, times the 400 x 16 weight, through nn.layers._mm as the layers run it,
    cut into row blocks for OpenBLAS's small-matrix kernels; the rows of one cache-sized
    block on the CPU, of batch 512 in one block on a device), the ceiling of im2col +
    matmul convolutions before any copying; and copy GB/s (bytes copied per second of a 64 MB array, split
    over the threads, as memcpy benchmarks count)."""
    sync = lambda: synchronize(xp)
    fastest = lambda fn: min(timed(fn, sync) for _ in range(3 if quick else 8))      # seconds
    n = 1024 if quick else 2048
    k = get_num_threads() if xp is np else 1
    rng = np.random.default_rng(0)
    mats = [xp.asarray(rng.random((n, n), dtype=np.float32)) for _ in range(k)]
    best = fastest(lambda: parallel_map(lambda a: a @ a, mats))
    K, F, patches = 400, 16, 64                     # conv2: 5*5*16 values, 16 filters, 8x8 outputs
    images = max(1, L._BLOCK_BYTES // (patches * K * 4)) if xp is np else 512
    rows, reps = images * patches, 20 if xp is np else 5
    blocks = [(xp.asarray(rng.random((rows, K), dtype=np.float32)),
               xp.asarray(rng.random((K, F), dtype=np.float32))) for _ in range(k)]
    conv_mm = lambda ab: [L._mm(xp, ab[0][None], ab[1][None]) for _ in range(reps)]   # as the layers do
    best_conv = fastest(lambda: parallel_map(conv_mm, blocks))
    src = xp.ones(16 << 20, dtype=xp.float32)
    dst = xp.empty_like(src)
    parts = split_range(src.size, k)
    best_copy = fastest(lambda: parallel_map(lambda s: xp.copyto(dst[s], src[s]), parts))
    return {'matmul_gflops': k * 2 * n ** 3 / best / 1e9, 'copy_gbps': src.nbytes / best_copy / 1e9,
            'conv_matmul_gflops': k * reps * 2 * rows * K * F / best_conv / 1e9, 'conv_matmul_shape': [rows, K, F]}


# =========================================================================== the step

def step_flops(cfg, G, m):
    """Analytic FLOPs (2 per multiply-add, matmuls only) of one step with G tasks x m images:
    classifier forward and backward (dw for every layer, dx for all but the first conv),
    generator forward and backward (dW and dh of every layer)."""
    H, W, C = cfg.image_shape
    fwd = bwd = 0
    for i, F in enumerate(cfg.conv_filters):
        H, _, _ = L.conv_output_size(H, cfg.kernel, cfg.stride, cfg.padding)
        W, _, _ = L.conv_output_size(W, cfg.kernel, cfg.stride, cfg.padding)
        f = 2 * m * H * W * cfg.kernel * cfg.kernel * C * F
        fwd += f
        bwd += f if i == 0 else 2 * f
        C = F
    for D, F in zip((H * W * C,) + cfg.fc, cfg.fc + (1,)):
        fwd += 2 * m * D * F
        bwd += 4 * m * D * F
    _, P = S.classifier_layout(cfg)
    dims = [cfg.z_dim, *cfg.gen_hidden, P]
    gen = sum(2 * G * a * b for a, b in zip(dims[:-1], dims[1:]))      # forward; backward is 2x
    return {'classifier_fwd': G * fwd, 'classifier_bwd': G * bwd, 'generator': 3 * gen,
            'total': G * (fwd + bwd) + 3 * gen}


class Bench:
    """A SuperNet, its optimizer and one fixed batch of G tasks x m images on device xp."""

    def __init__(self, cfg, G, m, xp, seed=0):
        r = np.random.default_rng(seed)
        self.cfg, self.G, self.m, self.xp = cfg, G, m, xp
        self.params = S.init_params(cfg, seed=seed, xp=xp)
        self.opt = Optimizer('rmsprop', learning_rate=1e-4)
        self.x = to_device(r.normal(size=(G, m) + cfg.image_shape).astype(np.float32), xp)
        self.y = to_device((r.random((G, m)) > 0.5).astype(np.float32), xp)
        self.tasks = np.arange(G) * (cfg.n_tasks // G)          # distinct, spread out

    def step(self):
        """The training step being benchmarked: all G tasks in one step."""
        loss, grads, _ = S.loss_and_grads(self.params, self.x, self.y, self.tasks, self.cfg, lowrank=True)
        self.opt.step(self.params, grads)
        return loss

    def one_task_steps(self):
        """The same images as G one-task steps of m images each (the comparison for mixing)."""
        for g in range(self.G):
            loss, grads, _ = S.loss_and_grads(self.params, self.x[g:g + 1], self.y[g:g + 1],
                                              self.tasks[g:g + 1], self.cfg, lowrank=True)
            self.opt.step(self.params, grads)

    def breakdown(self, warmup, repeats):
        """{part: median ms} of the real step's parts, on one thread (each part's CPU work).
        The functions the step calls are wrapped with timers for the duration (PartTimer);
        'other' is the step's time outside them (fc layers, loss, split/merge, z rows)."""
        threads = get_num_threads()
        if self.xp is np:
            set_num_threads(1)
        try:
            with PartTimer(self.cfg, self.xp, self.opt) as pt:
                for k in range(warmup + repeats):
                    pt.start_step()
                    self.step()
                    pt.end_step(keep=k >= warmup)
            return pt.medians()
        finally:
            if self.xp is np:
                set_num_threads(threads)

    def peak_memory(self):
        """Peak bytes of the numpy allocations made during one step (tracemalloc; host only),
        on a device with a CuPy memory pool the bytes the pool holds after one step from
        an emptied pool (parameters, optimizer state and batch, which stay allocated, plus
        the step's peak of temporaries, which the pool keeps cached for reuse), the
        process's peak resident set so far, and the page faults of one (untraced) step:
        a step that keeps allocating fresh memory pays for it in faults."""
        traced = device_pool = None
        if self.xp is np:
            kind = set_shard_workers('threads')     # every shard's allocations in this process
            try:
                tracemalloc.start()
                self.step()
                traced = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            finally:
                set_shard_workers(kind)
            self.step()                             # settle the heap again before counting faults
        elif hasattr(self.xp, 'get_default_memory_pool'):
            pool = self.xp.get_default_memory_pool()
            synchronize(self.xp)
            pool.free_all_blocks()              # only blocks no array uses go back
            self.step()
            synchronize(self.xp)
            device_pool = pool.total_bytes()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        self.step()
        synchronize(self.xp)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        mb = lambda b: None if b is None else b / 2 ** 20
        return {'step_peak_mb': mb(traced), 'device_pool_mb': mb(device_pool), 'rss_peak_mb': peak_rss_mb(),
                'page_faults_per_step': faults}


class PartTimer:
    """Times the parts of the real step by wrapping, while in use, the module functions it
    calls: supernet's generator forward/backward, nn.layers' conv and leaky-ReLU forward and
    backward, and the optimizer's step. Conv calls are named by layer from their order in
    the step (forward conv1..convL, backward convL..conv1). A call made inside another
    timed call (the generator's hidden leaky ReLUs) counts for the outer one only. Not
    thread-safe: use with one thread."""

    def __init__(self, cfg, xp, optimizer):
        self.sync = lambda: synchronize(xp)
        self.n_conv = len(cfg.conv_filters)
        self.rule = optimizer.rule
        self.targets = [
            (S, 'generator_forward', lambda: 'generator forward'),
            (S, 'generator_backward', lambda: 'generator backward'),
            (L, 'conv_forward', lambda: f'conv{self._count("fwd") % self.n_conv + 1} forward'),
            (L, 'conv_backward', lambda: f'conv{self.n_conv - self._count("bwd") % self.n_conv} backward'),
            (L, 'leaky_relu_forward', lambda: 'leaky ReLU forward (all)'),
            (L, 'leaky_relu_backward', lambda: 'leaky ReLU backward (all)'),
            (optimizer, 'step', lambda: f'optimizer ({self.rule})'),
        ]
        self.laps, self.step_laps, self.counts, self.depth = {}, {}, {}, 0

    def _count(self, kind):
        """How many calls of this kind came before in this step."""
        k = self.counts.get(kind, 0)
        self.counts[kind] = k + 1
        return k

    def __enter__(self):
        self.saved = [(obj, name, getattr(obj, name)) for obj, name, _ in self.targets]
        for (obj, name, namer), (_, _, fn) in zip(self.targets, self.saved):
            setattr(obj, name, self._timed(fn, namer))
        return self

    def __exit__(self, *exc):
        for obj, name, fn in self.saved:
            if obj is L or obj is S:
                setattr(obj, name, fn)
            else:
                delattr(obj, name)           # the instance attribute shadowed the method
        return False

    def _timed(self, fn, namer):
        def wrapper(*args, **kwargs):
            if self.depth:                       # inside another timed part: its time
                return fn(*args, **kwargs)
            name = namer()
            self.sync()
            t = time.perf_counter()
            self.depth += 1
            try:
                out = fn(*args, **kwargs)
            finally:
                self.depth -= 1
            self.sync()
            self.step_laps[name] = self.step_laps.get(name, 0.0) + time.perf_counter() - t
            return out
        return wrapper

    def start_step(self):
        self.step_laps, self.counts = {}, {}
        self.sync()
        self.t0 = time.perf_counter()

    def end_step(self, keep):
        self.sync()
        total = time.perf_counter() - self.t0
        if keep:
            self.step_laps['other (fc layers, loss, split/merge, z rows)'] = total - sum(self.step_laps.values())
            for k, v in self.step_laps.items():
                self.laps.setdefault(k, []).append(v)

    def medians(self):
        order = ['generator forward'] + sorted(k for k in self.laps if k.endswith(' forward') and k.startswith('conv')) \
            + ['leaky ReLU forward (all)'] \
            + sorted((k for k in self.laps if k.endswith(' backward') and k.startswith('conv')), reverse=True) \
            + ['leaky ReLU backward (all)', 'generator backward', f'optimizer ({self.rule})',
               'other (fc layers, loss, split/merge, z rows)']
        return {k: 1e3 * float(np.median(self.laps[k])) for k in order if k in self.laps}


# =========================================================================== PyTorch

def torch_module():
    try:
        import torch
    except ImportError as e:
        raise RuntimeError("--vs-torch needs PyTorch (pip install torch); it is not a dependency "
                           "of supernet") from e
    return torch


class TorchStep:
    """The same SuperNet step in PyTorch with autograd: generator -> tanh -> each task's
    classifier (NHWC images and HWIO weights permuted to torch's NCHW/OIHW, TF SAME
    padding done explicitly before a VALID conv), mean sigmoid cross-entropy, and TF1
    RMSProp (mean square starts at 1, eps inside the sqrt) on the generator and z."""

    def __init__(self, cfg, params, device='cpu', dtype=None, lr=1e-4, decay=0.9, eps=1e-10):
        torch = self.torch = torch_module()
        self.cfg, self.device = cfg, device
        self.dtype = dtype or torch.float32
        self.params = {k: torch.tensor(to_host(v), device=device, dtype=self.dtype).requires_grad_()
                       for k, v in params.items()}
        self.ms = {k: torch.ones_like(v) for k, v in self.params.items()}
        self.lr, self.decay, self.eps = lr, decay, eps
        self.layout = S.classifier_layout(cfg)[0]

    def tensor(self, a):
        return self.torch.tensor(to_host(a), device=self.device, dtype=self.dtype)

    def _classifier(self, x, theta):
        """x (m, H, W, C) NHWC, theta (P,) -> logits (m,)."""
        F, cfg = self.torch.nn.functional, self.cfg
        w = {k: theta[off:off + n].view(shape) for k, (off, n, shape) in self.layout.items()}
        h = x.permute(0, 3, 1, 2)                                        # NCHW
        for i in range(1, len(cfg.conv_filters) + 1):
            _, pt, pb = L.conv_output_size(h.shape[2], cfg.kernel, cfg.stride, cfg.padding)
            _, pl, pr = L.conv_output_size(h.shape[3], cfg.kernel, cfg.stride, cfg.padding)
            h = F.pad(h, (pl, pr, pt, pb))                               # (W), then (H)
            h = F.conv2d(h, w[f'conv{i}.w'].permute(3, 2, 0, 1), w[f'conv{i}.b'], stride=cfg.stride)
            h = F.leaky_relu(h, cfg.alpha)
        h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)                # flatten in NHWC order
        for j in range(1, len(cfg.fc) + 1):
            h = h @ w[f'fc{j}.w'] + w[f'fc{j}.b']
            if cfg.fc_activation:
                h = F.leaky_relu(h, cfg.alpha)
        return (h @ w['out.w'] + w['out.b'])[:, 0]

    def loss_and_grads(self, x, y, tasks):
        """x (G, m, H, W, C), y (G, m) torch tensors -> loss, {key: grad} (torch)."""
        torch, cfg, p = self.torch, self.cfg, self.params
        h = p['z'][torch.as_tensor(np.asarray(tasks), device=self.device)]
        for l in range(1, len(cfg.gen_hidden) + 1):
            h = torch.nn.functional.leaky_relu(h @ p[f'gen.h{l}.w'] + p[f'gen.h{l}.b'], cfg.alpha)
        theta = h @ p['gen.out.w'] + p['gen.out.b']
        if cfg.gen_output == 'tanh':
            theta = torch.tanh(theta)
        logits = torch.stack([self._classifier(x[g], theta[g]) for g in range(x.shape[0])])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        keys = list(p)
        return loss, dict(zip(keys, torch.autograd.grad(loss, [p[k] for k in keys])))

    def step(self, x, y, tasks):
        loss, grads = self.loss_and_grads(x, y, tasks)
        with self.torch.no_grad():
            for k, g in grads.items():
                ms = self.ms[k]
                ms.mul_(self.decay).addcmul_(g, g, value=1 - self.decay)
                self.params[k].addcdiv_(g, (ms + self.eps).sqrt_(), value=-self.lr)
        return loss


def torch_conv_parts(cfg, G, m, device, sync, warmup, repeats):
    """PyTorch's conv layers alone, laid out as TorchStep runs them (NHWC memory viewed as
    NCHW, so oneDNN takes its channels-last path; TF SAME padding by F.pad), on ONE thread
    like our breakdown: {'conv{i} forward' / 'conv{i} backward': median ms} for G*m images
    (one weight set: the per-layer cost of the kernels, not of the grouping)."""
    torch = torch_module()
    F = torch.nn.functional
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    r = np.random.default_rng(0)
    H, W, C = cfg.image_shape
    parts = {}
    try:
        for i, f in enumerate(cfg.conv_filters, 1):
            Ho, pt, pb = L.conv_output_size(H, cfg.kernel, cfg.stride, cfg.padding)
            Wo, pl, pr = L.conv_output_size(W, cfg.kernel, cfg.stride, cfg.padding)
            x = torch.tensor(r.normal(size=(G * m, H, W, C)).astype(np.float32), device=device)
            x = x.permute(0, 3, 1, 2).requires_grad_(i > 1)        # no input gradient for conv1
            w = torch.tensor(r.normal(size=(f, C, cfg.kernel, cfg.kernel)).astype(np.float32),
                             device=device, requires_grad=True)
            b = torch.zeros(f, device=device, requires_grad=True)
            fwd = lambda: F.conv2d(F.pad(x, (pl, pr, pt, pb)), w, b, stride=cfg.stride)
            out = fwd()
            dout = torch.tensor(r.normal(size=tuple(out.shape)).astype(np.float32), device=device)
            inputs = [x, w, b] if i > 1 else [w, b]
            both = lambda: torch.autograd.grad(fwd(), inputs, dout)
            t_fwd, t_both = median_ms([fwd, both], sync, warmup, repeats)
            parts[f'conv{i} forward'], parts[f'conv{i} backward'] = t_fwd, t_both - t_fwd
            H, W, C = Ho, Wo, f
    finally:
        torch.set_num_threads(threads)
    return parts


def torch_agreement(cfg, tasks=(1,), m=3, seed=0, corrupt=None):
    """Our loss and gradients against PyTorch autograd's, in float64, for random non-trivial
    parameters (random z and generator biases, weights scaled so the tanh is neither
    saturated nor linear). Returns {'loss': rel error, key: rel error of each gradient}.
    corrupt(grads) may alter our gradients first (to show the check can fail)."""
    torch = torch_module()
    r = np.random.default_rng(seed)
    p = S.init_params(cfg, seed=seed, dtype=np.float64)
    p['z'] = r.normal(size=p['z'].shape)
    for k in S.generator_keys(p):
        p[k] = r.normal(0, 0.1, size=p[k].shape) if k.endswith('.b') else p[k] * 2.0
    x = r.normal(size=(len(tasks), m) + cfg.image_shape)
    y = (r.random((len(tasks), m)) > 0.5).astype(np.float64)
    loss, grads, _ = S.loss_and_grads(p, x, y, list(tasks), cfg)
    if corrupt is not None:
        corrupt(grads)
    ts = TorchStep(cfg, p, dtype=torch.float64)
    t_loss, t_grads = ts.loss_and_grads(ts.tensor(x), ts.tensor(y), list(tasks))
    errs = {'loss': rel_error(np.asarray(float(loss)), np.asarray(float(t_loss.detach())))}
    errs.update({k: rel_error(grads[k], t_grads[k].detach().cpu().numpy()) for k in p})
    return errs


# =========================================================================== driver

def step_name(G, m):
    """'B=128' for one task, '8x64' for G tasks x m images."""
    return f'{G}x{m}' if G > 1 else f'B={m}'


def cpu_name():
    """'AMD EPYC (family 26, model 2)' from /proc/cpuinfo (Linux), else platform's guess.
    The family tells CPU generations apart where the model name does not (here: the
    name only says 'AMD EPYC'; family 25 is Zen 3/4, 26 is Zen 5)."""
    try:
        with open('/proc/cpuinfo') as f:
            info = dict(line.split(':', 1) for line in f.read().split('\n\n')[0].splitlines() if ':' in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        return f"{info['model name']} (family {info['cpu family']}, model {info['model']})"
    except (OSError, KeyError, ValueError):
        return platform.processor() or platform.machine()


def gpu_name(xp):
    """The CUDA device's name ('NVIDIA H100 80GB HBM3') on CuPy, None elsewhere."""
    cuda = getattr(xp, 'cuda', None)
    if xp is np or cuda is None:
        return None
    props = cuda.runtime.getDeviceProperties(cuda.Device().id)
    name = props['name']
    return name.decode() if isinstance(name, bytes) else str(name)


def run(args, xp):
    cfg = S.Config(n_tasks=N_TASKS)
    quick = args.quick
    warmup, repeats = (1, 3) if quick else (3, 15)
    sync = lambda: synchronize(xp)
    threads = get_num_threads() if xp is np else 1
    res = {'machine': {'device': args.device, 'threads': threads, 'shard_workers': get_shard_workers() if threads > 1 else None,
                       'numpy': np.__version__,
                       'python': platform.python_version(), 'cpus': os.cpu_count(), 'cpu': cpu_name(), 'gpu': gpu_name(xp)},
           'config': {'n_tasks': cfg.n_tasks, 'classifier_params': S.count_params(cfg)['classifier'],
                      'generator_params': S.count_params(cfg)['generator'], 'warmup': warmup,
                      'repeats': repeats},
           'steps': [], 'breakdown': {}, 'memory': {}}
    one = step_flops(cfg, 1, 1)
    res['config']['flops'] = {'image_fwd': one['classifier_fwd'],
                              'image_fwd_bwd': one['classifier_fwd'] + one['classifier_bwd'],
                              'task_gen': one['generator']}
    res['machine'].update(machine_peaks(xp, quick))
    torch_dev = 'cuda' if args.device == 'gpu' else 'cpu'
    if args.vs_torch:
        torch = torch_module()
        torch.set_num_threads(get_num_threads())
        res['machine']['torch'] = torch.__version__
        res['machine']['torch_threads'] = torch.get_num_threads()
        tsync = (lambda: (torch.cuda.synchronize(), sync())) if torch_dev == 'cuda' else sync

    shapes = [(1, b) for b in args.batches] + [tuple(args.mixed)]
    for G, m in shapes:
        name = step_name(G, m)
        b = Bench(cfg, G, m, xp)
        row = {'name': name, 'tasks': G, 'per_task': m, 'images': G * m}
        if args.vs_torch:
            ts = TorchStep(cfg, b.params, device=torch_dev)
            tx, ty = ts.tensor(b.x), ts.tensor(b.y)
            ours, theirs = median_ms([b.step, lambda: ts.step(tx, ty, b.tasks)], tsync, warmup, repeats,
                                     run=3)
            row.update(torch_ms=theirs, speed_vs_torch=theirs / ours)
        else:
            ours, = median_ms([b.step], sync, warmup, repeats)
        fl = step_flops(cfg, G, m)
        row.update(ms=ours, images_per_s=G * m / ours * 1e3, gflop=fl['total'] / 1e9,
                   gflops=fl['total'] / ours / 1e6)
        row['peak_fraction'] = row['gflops'] / res['machine']['matmul_gflops']
        row['loss_finite'] = bool(np.isfinite(float(to_host(b.step()))))
        res['steps'].append(row)
        res['breakdown'][name] = b.breakdown(1, max(3, repeats // 2))
        res['memory'][name] = b.peak_memory()

    # one mixed G x m step against G one-task steps of m images (the same images)
    G, m = args.mixed
    b = Bench(cfg, G, m, xp)
    ms_mixed, ms_singles = median_ms([b.step, b.one_task_steps], sync, warmup, repeats)
    res['mixed_vs_single'] = {'tasks': G, 'per_task': m, 'mixed_step_ms': ms_mixed,
                              'one_task_steps_ms': ms_singles,
                              'images_per_s_ratio': ms_singles / ms_mixed}
    if args.vs_torch:
        # last: PyTorch's big allocations would change the heap our later steps reuse
        res['torch_breakdown'] = {step_name(G, m): torch_conv_parts(
            cfg, G, m, torch_dev, tsync, 1, max(3, repeats // 2)) for G, m in shapes}
        errs = torch_agreement(cfg, tasks=(1, 4), m=2)
        res['torch_check'] = {'dtype': 'float64', 'max_rel_error': max(errs.values()), 'rel_errors': errs}
    return res


def print_table(res, out=None):
    m = res['machine']
    p = lambda *a: print(*a, file=out or sys.stdout)
    shards = f"classifier shards in worker {m.get('shard_workers', 'threads')}, " if m['threads'] > 1 else ''
    p(f"machine: {m['device']} ({m.get('gpu') or m.get('cpu', '?')}), {m['threads']} threads ({shards}BLAS on 1), "
      f"numpy {m['numpy']}; float32 matmul peak "
      f"{m['matmul_gflops']:.0f} GFLOP/s (conv-shaped {'x'.join(map(str, m['conv_matmul_shape'][:2]))} @ "
      f"{'x'.join(map(str, m['conv_matmul_shape'][1:]))}: {m['conv_matmul_gflops']:.0f}), "
      f"copy {m['copy_gbps']:.1f} GB/s"
      + (f"; torch {m['torch']} ({m['torch_threads']} threads)" if 'torch' in m else ''))
    c = res['config']
    p(f"step: loss_and_grads + rmsprop over {c['generator_params']:,} generator params + z, "
      f"Config(n_tasks={c['n_tasks']}); median of {c['repeats']} after {c['warmup']} warm-up")
    f = c['flops']
    p(f"FLOPs (matmuls, analytic): classifier {f['image_fwd'] / 1e6:.2f} MFLOP/image forward, "
      f"{f['image_fwd_bwd'] / 1e6:.2f} forward+backward; generator {f['task_gen'] / 1e6:.1f} MFLOP/task (fwd+bwd)")
    vs = 'torch_ms' in res['steps'][0]
    head = f"{'step':>8} {'images':>6} {'ms/step':>8} {'images/s':>9} {'GFLOP':>6} {'GFLOP/s':>8} {'of peak':>7}"
    p(head + (f" {'torch ms':>9} {'torch/ours':>10}" if vs else ''))
    for r in res['steps']:
        line = (f"{r['name']:>8} {r['images']:>6} {r['ms']:>8.1f} {r['images_per_s']:>9.0f} {r['gflop']:>6.2f} "
                f"{r['gflops']:>8.1f} {100 * r['peak_fraction']:>6.1f}%")
        if vs:
            line += f" {r['torch_ms']:>9.1f} {r['speed_vs_torch']:>10.2f}"
        p(line)
    mv = res['mixed_vs_single']
    p(f"mixed: one {mv['tasks']}x{mv['per_task']} step {mv['mixed_step_ms']:.1f} ms vs {mv['tasks']} one-task steps "
      f"of {mv['per_task']} images {mv['one_task_steps_ms']:.1f} ms (the same {mv['tasks'] * mv['per_task']} images): "
      f"images/s ratio {mv['images_per_s_ratio']:.2f}x (target >= 2x)")
    names = list(res['breakdown'])
    parts = list(dict.fromkeys(k for b in res['breakdown'].values() for k in b))
    p("per-part breakdown: ms of CPU work on ONE thread (median; the step's functions timed in place):")
    p(f"{'part':>32} " + ' '.join(f'{n:>8}' for n in names))
    for part in parts + ['sum of parts']:
        vals = [sum(b.values()) if part == 'sum of parts' else b.get(part, float('nan'))
                for b in res['breakdown'].values()]
        p(f"{part:>32} " + ' '.join(f'{v:>8.2f}' for v in vals))
    if 'torch_breakdown' in res:
        p("PyTorch's conv layers alone, same images, ONE thread (ms, median; backward = forward+backward - forward):")
        tb = res['torch_breakdown']
        for part in tb[names[0]]:
            p(f"{'torch ' + part:>32} " + ' '.join(f"{tb[n].get(part, float('nan')):>8.2f}" for n in names))
    p("peak memory of a step (numpy allocations in the step, tracemalloc; on a GPU the CuPy pool after one step "
      "from empty: parameters, state, batch and the step's peak; peak RSS, worker processes included; "
      "page faults of this process):")
    for n, v in res['memory'].items():
        numpy_mb = 'n/a' if v['step_peak_mb'] is None else f"{v['step_peak_mb']:.1f} MB"
        dev = '' if v.get('device_pool_mb') is None else f", device pool {v['device_pool_mb']:.1f} MB"
        p(f"{n:>8}: numpy {numpy_mb}{dev}, RSS {v['rss_peak_mb']:.0f} MB, {v['page_faults_per_step']} page faults")
    if 'torch_check' in res:
        t = res['torch_check']
        worst = max(t['rel_errors'], key=t['rel_errors'].get)
        p(f"torch oracle ({t['dtype']}): max rel. error {t['max_rel_error']:.1e} ({worst}) over loss and "
          f"{len(t['rel_errors']) - 1} gradients: {'PASS' if t['max_rel_error'] < 1e-6 else 'FAIL'} (bound 1e-6)")


def build_parser():
    ap = argparse.ArgumentParser(prog='bench.py', description=__doc__.split('\n\n')[0])
    ap.add_argument('--quick', action='store_true', help='fewer repeats, smaller peak probe')
    ap.add_argument('--threads', type=int, default=0,
                    help="CPU threads, ours and PyTorch's (default 0: every usable CPU)")
    ap.add_argument('--device', choices=('cpu', 'gpu'), default='cpu')
    ap.add_argument('--vs-torch', action='store_true', help='time PyTorch side by side and check it agrees')
    ap.add_argument('--json', metavar='PATH', help='also save the results as JSON')
    ap.add_argument('--batches', type=int_at_least(1), nargs='+', default=[20, 128, 512], help='one-task batch sizes')
    ap.add_argument('--mixed', type=int_at_least(1), nargs=2, default=[8, 64], metavar=('TASKS', 'PER_TASK'),
                    help=f'the mixed-task step (TASKS <= {N_TASKS})')
    return ap


def parse_args(argv=None):
    """The options, checked before any work starts (ap.error: a one-line message, exit 2)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    bad_threads = threads_error(args.threads)
    if bad_threads:
        ap.error(bad_threads)
    if args.mixed[0] > N_TASKS:
        ap.error(f"--mixed {args.mixed[0]} {args.mixed[1]}: there are only {N_TASKS} tasks")
    names = [step_name(1, b) for b in args.batches] + [step_name(*args.mixed)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        ap.error(f"--batches/--mixed: step {', '.join(twice)} is given twice")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json):
            ap.error(f"--json {args.json}: is a directory")
        if not os.path.isdir(folder):
            ap.error(f"--json {args.json}: {folder} is not an existing folder")
        if not os.access(folder, os.W_OK) or (os.path.exists(args.json) and not os.access(args.json, os.W_OK)):
            ap.error(f"--json {args.json}: not writable")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        xp = get_device_module(args.device)
        if args.vs_torch:
            torch_module()
    except RuntimeError as e:                # no CuPy / CUDA device, or no PyTorch
        build_parser().error(str(e))
    if xp is np:
        set_num_threads(args.threads)        # ours; BLAS on one thread
    res = run(args, xp)
    print_table(res)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == '__main__':
    main()
