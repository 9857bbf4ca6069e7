"""CPU threads (nn.backend.set_num_threads) change how the work is split, never the
result: the sharded classifier and the optimizers' chunks give the serial numbers (to float rounding in sums; bit for bit where nothing is summed).
Also the rank-G generator gradient (nn.optim.LowRank), which the optimizers build chunk
by chunk, against the formed gradient."""
import numpy as np
import pytest

import supernet as S
from nn import backend, optim
from nn.gradcheck import rel_error
from nn.optim import LowRank, Optimizer
from nn.backend import to_device, to_host
from tests.strict_xp import strict


@pytest.fixture
def threads():
    """Run a block of code with n threads: threads(n); restored by conftest."""
    return backend.set_num_threads


def test_set_num_threads_and_parallel_map(threads):
    assert threads(3) == 3 and backend.get_num_threads() == 3
    assert backend.parallel_map(lambda i: i * i, range(7)) == [i * i for i in range(7)]
    assert threads(0) == backend.usable_cpus()          # 0: every usable CPU
    with pytest.raises(ValueError, match='>= 1'):
        threads(-1)
    threads(2)

    def boom(i):
        if i == 1:
            raise KeyError('worker failed')
        return i
    with pytest.raises(KeyError, match='worker failed'):      # a worker's error reaches the caller
        backend.parallel_map(boom, range(4))
    assert backend.split_range(10, 3) == [slice(0, 3), slice(3, 6), slice(6, 10)]
    assert backend.split_range(2, 5) == [slice(0, 1), slice(1, 2)]


def test_blas_is_set_to_one_thread_where_openblas_is_loaded(threads):
    try:
        with open('/proc/self/maps') as f:
            has_openblas = 'openblas' in f.read().lower()
    except OSError:
        pytest.skip('no /proc/self/maps here (not Linux)')
    if not has_openblas:
        pytest.skip('numpy here does not use OpenBLAS')
    before = backend.get_blas_threads()
    try:
        assert backend.set_blas_threads(2) is True and backend.get_blas_threads() == 2
        threads(2)
        assert backend.get_blas_threads() == 1
    finally:
        backend.set_blas_threads(before)


def test_parallel_map_waits_for_every_item_before_an_error_goes_up(threads):
    import time
    threads(3)
    finished = []

    def work(i):
        if i == 1:
            raise RuntimeError('item 1 failed')
        time.sleep(0.2 if i == 2 else 0)
        finished.append(i)
    with pytest.raises(RuntimeError, match='item 1 failed'):
        backend.parallel_map(work, range(3))
    assert sorted(finished) == [0, 2]            # the slow item 2 was done before the raise


CFG = S.Config(n_tasks=6)


def test_processes_cut_smaller_batches_than_threads(threads, monkeypatch):
    """Shards of 8+ images for worker processes, 16+ for threads; the training step cuts
    for what map_shards uses, the forward alone (evaluation) for threads."""
    threads(2)
    assert S._shards(1, 20, np, 'processes') == ('m', [slice(0, 10), slice(10, 20)])
    assert S._shards(1, 15, np, 'processes') is None
    assert S._shards(2, 8, np, 'processes') == ('G', [slice(0, 1), slice(1, 2)])
    assert S._shards(1, 20, np) is None and S._shards(1, 20, np, 'threads') is None
    assert S._shards(2, 8, np, 'threads') is None
    seen = []
    real = S._shards
    monkeypatch.setattr(S, '_shards', lambda *a: seen.append(a[3:]) or real(*a))
    cfg = S.Config(n_tasks=3)
    p = S.init_params(cfg)
    x = np.random.default_rng(0).normal(size=(1, 20) + cfg.image_shape).astype(np.float32)
    weights = S.split_theta(S.generator_forward(p['z'][:1], p, cfg)[0], cfg)
    S.classifier_forward(x, weights, cfg)
    old = backend.set_shard_workers('threads')
    try:
        S.classifier_loss_and_grads(x, np.zeros((1, 20), np.float32), weights, cfg)
    finally:
        backend.set_shard_workers(old)
    assert seen == [(), ('threads',)]


def test_how_the_batch_is_cut(threads):
    threads(2)
    assert S._shards(1, 20, np) is None                          # too few images: one thread
    assert S._shards(1, 128, np) == ('m', [slice(0, 64), slice(64, 128)])
    assert S._shards(8, 64, np) == ('G', [slice(0, 4), slice(4, 8)])      # whole groups when they divide
    assert S._shards(3, 64, np) == ('m', [slice(0, 32), slice(32, 64)])   # else images, evenly
    assert S._shards(3, 2, np) is None                                   # 6 images: one thread
    assert S._shards(40, 1, np) == ('G', [slice(0, 20), slice(20, 40)])
    assert S._shards(5, 1, np) is None
    assert S._shards(1, 128, strict) is None                     # a device: no CPU threads
    threads(1)
    assert S._shards(1, 512, np) is None


@pytest.mark.parametrize('G,m', [(1, 40), (3, 12), (4, 1), (1, 3)])   # image shards, group shards, serial
def test_sharded_step_equals_serial(threads, monkeypatch, G, m):
    monkeypatch.setattr(S, '_MIN_SHARD', {'processes': 1, 'threads': 1})   # shard even these small batches
    r = np.random.default_rng(G * 100 + m)
    p = S.init_params(CFG, dtype=np.float64)
    p['z'] = r.normal(size=p['z'].shape)
    x = r.normal(size=(G, m, 32, 32, 3))
    y = (r.random((G, m)) > 0.5).astype(np.float64)
    tasks = list(range(G))
    out = {}
    for n in (1, 2, 3):
        threads(n)
        loss, grads, logits = S.loss_and_grads(p, x, y, tasks, CFG)
        out[n] = (loss, grads, logits)
    for n in (2, 3):
        assert rel_error(out[1][0], out[n][0]) < 1e-13
        assert rel_error(out[1][2], out[n][2]) < 1e-13
        for k in out[1][1]:
            assert rel_error(out[1][1][k], out[n][1][k]) < 1e-12, (n, k)


@pytest.mark.parametrize('G,m', [(1, 40), (4, 1), (2, 7)])
def test_classifier_loss_and_grads_equals_its_three_parts(threads, monkeypatch, G, m):
    """The one-hand-off sharded step (each shard: forward, its share of the mean loss,
    backward) against forward + loss + backward, on one and on three threads."""
    from nn.loss import sigmoid_cross_entropy
    monkeypatch.setattr(S, '_MIN_SHARD', {'processes': 1, 'threads': 1})
    r = np.random.default_rng(G + m)
    p = S.init_params(CFG, dtype=np.float64)
    theta, _ = S.generator_forward(r.normal(size=(G, CFG.z_dim)), p, CFG)
    w = S.split_theta(theta, CFG)
    x = r.normal(size=(G, m, 32, 32, 3))
    y = (r.random((G, m)) > 0.5).astype(np.float64)
    threads(1)
    logits, cache = S.classifier_forward(x, w, CFG)
    loss, dlogits = sigmoid_cross_entropy(logits, y)
    ref = S.classifier_backward(dlogits, cache)
    for n in (1, 3):
        threads(n)
        loss2, g2, logits2 = S.classifier_loss_and_grads(x, y, w, CFG)
        assert rel_error(loss, loss2) < 1e-14 and rel_error(logits, logits2) < 1e-14
        assert set(g2) == set(ref)
        for k in ref:
            assert g2[k].shape == ref[k].shape and rel_error(ref[k], g2[k]) < 1e-12, (n, k)


def test_sharded_classifier_input_gradient(threads, monkeypatch):
    """classifier_backward(need_dx=True) joins the shards' image gradients in order
    (against one thread; tests/test_supernet.py checks the gradient itself)."""
    monkeypatch.setattr(S, '_MIN_SHARD', {'processes': 1, 'threads': 1})
    r = np.random.default_rng(5)
    p = S.init_params(CFG, dtype=np.float64)
    theta, _ = S.generator_forward(p['z'][:2], p, CFG)
    w = S.split_theta(theta, CFG)
    for G, m in [(2, 40), (2, 3)]:                    # image shards; group shards
        x = r.normal(size=(G, m, 32, 32, 3))
        d = r.normal(size=(G, m))
        res = []
        for n in (1, 2):
            threads(n)
            logits, cache = S.classifier_forward(x, {k: v[:G] for k, v in w.items()}, CFG)
            res.append(S.classifier_backward(d, cache, need_dx=True)['x'])
        assert res[0].shape == x.shape and rel_error(res[0], res[1]) < 1e-13


RULES = [('sgd', {}), ('sgd_momentum', {}), ('rmsprop', {}), ('rmsprop', {'momentum': 0.5}), ('adam', {})]


@pytest.mark.parametrize('rule,hyper', RULES)
def test_optimizer_threads_are_bit_identical(threads, rule, hyper):
    """Element-wise updates: how the chunks are shared out cannot change a single bit."""
    r = np.random.default_rng(0)
    w0 = r.normal(size=(7, 60000)).astype(np.float32)          # several chunks
    grads = [r.normal(size=w0.shape).astype(np.float32) for _ in range(3)]
    out = []
    for n in (1, 2, 3):
        threads(n)
        w, cfg = w0.copy(), dict(hyper)
        for g in grads:
            cfg = getattr(optim, rule)(w, g, cfg)
        out.append(w)
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[0], out[2])
    assert not np.array_equal(out[0], w0)


@pytest.mark.parametrize('rule,hyper', RULES)
@pytest.mark.parametrize('rank', [1, 3])
def test_lowrank_gradient_equals_the_formed_one(threads, rule, hyper, rank):
    r = np.random.default_rng(rank)
    w0 = r.normal(size=(101, 5003))                            # rows span several chunks
    steps = [(r.normal(size=(101, rank)), r.normal(size=(rank, 5003))) for _ in range(3)]
    for n in (1, 2):
        threads(n)
        w_dense, w_low, c_dense, c_low = w0.copy(), w0.copy(), dict(hyper), dict(hyper)
        for U, V in steps:
            c_dense = getattr(optim, rule)(w_dense, U @ V, c_dense)
            c_low = getattr(optim, rule)(w_low, LowRank(U, V), c_low)
        assert rel_error(w_dense, w_low) < 1e-13, n
        assert not np.array_equal(w_low, w0)
        for k in optim._STATE_KEYS:
            if k in c_dense:
                assert rel_error(c_dense[k], c_low[k]) < 1e-13


@pytest.mark.parametrize('momentum', [0.0, 0.5])
def test_rmsprop_rank_one_never_builds_the_gradient(threads, monkeypatch, momentum):
    """rmsprop's rank-1 path works from u and v (g*g = u^2 v^2, g/s = v/s * u): no row of
    U @ V is built, in float32 it agrees with the formed gradient to rounding, and the
    thread count changes no bit."""
    r = np.random.default_rng(11)
    w0 = r.normal(size=(101, 7001)).astype(np.float32)
    steps = [(r.normal(size=(101, 1)).astype(np.float32), r.normal(size=(1, 7001)).astype(np.float32))
             for _ in range(3)]
    steps[0][0][4] = 0.0                                      # a zero row and a zero column
    steps[0][1][0, 9] = 0.0
    built = []
    real_rows = LowRank.rows
    monkeypatch.setattr(LowRank, 'rows', lambda self, *a, **k: built.append(1) or real_rows(self, *a, **k))
    res = []
    for n in (1, 2):
        threads(n)
        w_dense, w_low = w0.copy(), w0.copy()
        c_dense = {'momentum': momentum, 'learning_rate': 1e-2}
        c_low = dict(c_dense)
        for U, V in steps:
            optim.rmsprop(w_dense, U @ V, c_dense)
            optim.rmsprop(w_low, LowRank(U, V), c_low)
        assert not built
        assert rel_error(w_dense - w0, w_low - w0) < 1e-5                  # the updates themselves (1.7e-6)
        assert rel_error(c_dense['cache'], c_low['cache']) < 1e-6
        assert not np.array_equal(w_low, w0) and np.isfinite(w_low).all()
        res.append(w_low)
    assert np.array_equal(res[0], res[1])


@pytest.mark.parametrize('dtype,tol', [(np.float32, 1e-6), (np.float64, 1e-13)])
def test_lowrank_rows_in_column_blocks_equal_the_product(dtype, tol):
    """Rank > 1: the rows are built by products over column blocks (OpenBLAS's small-matrix
    kernels, nn.layers.small_product_block); the same numbers as U @ V to rounding."""
    from nn import layers
    r = np.random.default_rng(9)
    U, V = r.normal(size=(101, 8)).astype(dtype), r.normal(size=(8, 37165)).astype(dtype)
    assert layers.small_product_block(np, 37165, 8, 7) is not None       # a 7-row chunk is cut
    g = LowRank(U, V)
    out = np.full((7, 37165), np.nan, dtype)
    assert g.rows(slice(3, 10), out=out) is out
    assert rel_error(out, U[3:10] @ V) < tol
    assert rel_error(g.materialize(), U @ V) < tol


def test_lowrank_edge_cases(threads):
    """One row wider than a chunk, a float64 product for float32 weights (formed, then
    cast like any gradient), zero columns; a non-contiguous gradient works, a
    non-contiguous parameter is refused (it could not be updated in place)."""
    r = np.random.default_rng(7)
    threads(2)
    cases = [((1, optim._CHUNK + 5), np.float64, np.float64), ((3, 40), np.float32, np.float64),
             ((4, 0), np.float64, np.float64)]
    for shape, wdt, gdt in cases:
        w0 = r.normal(size=shape).astype(wdt)
        U, V = r.normal(size=(shape[0], 2)).astype(gdt), r.normal(size=(2, shape[1])).astype(gdt)
        w1, w2 = w0.copy(), w0.copy()
        optim.rmsprop(w1, U @ V, {})
        optim.rmsprop(w2, LowRank(U, V), {})
        assert w2.dtype == wdt and np.array_equal(w1, w2), shape
    g = r.normal(size=(50, 30))
    w1, w2 = np.zeros((30, 50)), np.zeros((30, 50))
    optim.adam(w1, np.ascontiguousarray(g.T), {})
    optim.adam(w2, g.T, {})                                   # a transposed view
    assert np.array_equal(w1, w2)
    with pytest.raises(ValueError, match='C-contiguous'):
        optim.rmsprop(np.zeros((30, 50)).T, g, {})


def test_lowrank_rejects_bad_shapes_and_materializes():
    U, V = np.ones((4, 2)), np.arange(6.0).reshape(2, 3)
    g = LowRank(U, V)
    assert g.shape == (4, 3) and np.array_equal(g.materialize(), U @ V)
    assert np.array_equal(g.rows(slice(1, 3)), (U @ V)[1:3])
    with pytest.raises(ValueError, match='matrix product'):
        LowRank(np.ones((4, 2)), np.ones((3, 3)))
    with pytest.raises(ValueError, match='gradient shape'):
        optim.rmsprop(np.ones((4, 4)), g)


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_rank_one_rows_are_the_matrix_products_bit_for_bit(dtype, monkeypatch):
    # rank 1 is built by a broadcast multiply, not a matrix product: the same bits, signed
    # zeros included (a zero times a negative number is -0.0; np.dot gives +0.0)
    r = np.random.default_rng(5)
    U, V = r.normal(size=(7, 1)).astype(dtype), r.normal(size=(1, 1000)).astype(dtype)
    U[1], V[0, ::7] = 0.0, 0.0
    U[2] = -np.abs(U[2])
    dots = []
    real_dot = np.dot
    monkeypatch.setattr(np, 'dot', lambda *a, **k: dots.append(1) or real_dot(*a, **k))
    out = np.full((3, 1000), np.nan, dtype)
    LowRank(U, V).rows(slice(0, 3), out=out)
    full = LowRank(U, V).materialize()
    assert not dots                                         # the multiply path ran, not dot
    bits = lambda a: a.view(np.uint64 if dtype == np.float64 else np.uint32)
    expected = real_dot(U, V)
    assert (expected == 0).sum() > 1000 and not np.signbit(expected[expected == 0]).any()
    assert np.array_equal(bits(out), bits(expected[:3])) and np.array_equal(bits(full), bits(expected))


def test_rank_one_rows_on_the_device():
    U, V = np.arange(3.0).reshape(3, 1) - 1, np.arange(4.0).reshape(1, 4) - 2
    g = LowRank(to_device(U, strict), to_device(V, strict))
    assert np.array_equal(to_host(g.rows(slice(0, 2))), (U @ V)[:2])
    assert np.array_equal(to_host(g.materialize()), U @ V)


@pytest.mark.parametrize('tasks', [[0, 2], [1]])             # rank 2 (built), rank 1 (RMSProp's own path)
def test_training_step_with_lowrank_equals_formed_gradient_and_runs_on_the_device(tasks):
    """loss_and_grads(lowrank=True) + the optimizer = the formed-gradient step, on the CPU
    and on the strict device stand-in (where the product is formed whole)."""
    cfg = S.Config(image_shape=(8, 8, 3), conv_filters=(3, 4), kernel=3, fc=(5,), z_dim=6, n_tasks=4)
    r = np.random.default_rng(0)
    x = r.normal(size=(len(tasks), 3, 8, 8, 3))
    y = (r.random((len(tasks), 3)) > 0.5).astype(np.float64)
    res = {}
    for xp in (np, strict):
        for lowrank in (False, True):
            p = S.init_params(cfg, seed=0, xp=xp, dtype=np.float64)
            loss, g, _ = S.loss_and_grads(p, to_device(x, xp), to_device(y, xp), tasks, cfg, lowrank=lowrank)
            assert isinstance(g['gen.out.w'], LowRank) == lowrank
            Optimizer('rmsprop', learning_rate=1e-2).step(p, g)
            res[xp, lowrank] = {k: to_host(v) for k, v in p.items()}
    for key in res:
        for k in res[np, False]:
            assert rel_error(res[np, False][k], res[key][k]) < 1e-13, (key, k)


def test_generator_column_blocks_equal_one_thread(threads, monkeypatch):
    """From G = 2 task vectors on, the generator's big layer runs in column blocks small
    enough for OpenBLAS's small-matrix kernels, from _GEN_THREADS_MIN_G on also over the
    threads: the same theta, dZ and gradients as one whole product on one thread."""
    from nn import layers
    r = np.random.default_rng(3)
    cfg = S.Config(n_tasks=10, gen_hidden=(9,))
    p = S.init_params(cfg, dtype=np.float64)
    W = p['gen.out.w']
    assert S._gen_column_blocks(1, W, np) is None
    assert len(S._gen_column_blocks(8, W, np)[0]) > 1                 # cut
    for G in (1, 2, S._GEN_THREADS_MIN_G, 8):
        Z = r.normal(size=(G, cfg.z_dim))
        dtheta = r.normal(size=(G, S.count_params(cfg)['classifier']))
        res = []
        for n, mnk in ((1, 0), (1, layers._SMALL_GEMM_MNK), (3, layers._SMALL_GEMM_MNK), (3, 20000)):
            threads(n)
            monkeypatch.setattr(layers, '_SMALL_GEMM_MNK', mnk)
            theta, cache = S.generator_forward(Z, p, cfg)
            dZ, grads = S.generator_backward(dtheta, cache)
            res.append((theta, dZ, grads))
        for other in res[1:]:
            assert rel_error(res[0][0], other[0]) < 1e-13 and rel_error(res[0][1], other[1]) < 1e-13
            for k in res[0][2]:
                assert rel_error(res[0][2][k], other[2][k]) < 1e-13, (G, k)


@pytest.mark.parametrize('n', [1, 2])
def test_labels_of_the_wrong_shape_are_refused_on_any_thread_count(threads, n):
    """Not cut to the images' shards and silently dropped on several threads."""
    threads(n)
    cfg = S.Config(image_shape=(8, 8, 3), conv_filters=(3,), kernel=3, fc=(4,))
    w = {k: v[None] for k, v in S.init_classifier(cfg, np.random.default_rng(0)).items()}
    x = np.random.default_rng(1).normal(size=(1, 40, 8, 8, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r'labels \(1, 41\) do not match'):
        S.classifier_loss_and_grads(x, np.zeros((1, 41), np.float32), w, cfg)
    with pytest.raises(ValueError, match=r'labels \(1, 41\) do not match'):
        S.baseline_loss_and_grads({k: v[0] for k, v in w.items()}, x[0], np.zeros(41, np.float32), cfg)
