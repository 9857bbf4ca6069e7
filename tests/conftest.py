"""Shared pytest fixtures.

``tiny_cifar_dir``: a data_dir (the parent of ``cifar-100-python/``) holding a
small synthetic CIFAR-100 in the official format: 20 train / 10 test images
per fine class (2,000 / 1,000 images), seed 0. Written once per session.

``tiny_cifar``: that set loaded with ``data.load_cifar100`` (a ``Cifar100``).
Session-scoped and shared: do not modify its arrays in place (copy, or use
``dataclasses.replace``).

``_restore_cpu_threads`` (autouse): puts supernet's CPU thread count back after each
test. OpenBLAS stays on one thread once any test has started the pool; the tests
compare results within one thread setting, never across BLAS settings.
"""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # make `import data` (and the other top-level modules) work under plain `pytest`
    sys.path.insert(0, str(ROOT))

import data  # noqa: E402

TINY_TRAIN_PER_CLASS = 20
TINY_TEST_PER_CLASS = 10
TINY_SEED = 0


@pytest.fixture(scope="session")
def tiny_cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_cifar")
    data.write_synthetic_cifar100(root, n_train_per_class=TINY_TRAIN_PER_CLASS,
                                  n_test_per_class=TINY_TEST_PER_CLASS, seed=TINY_SEED)
    return root


@pytest.fixture(scope="session")
def tiny_cifar(tiny_cifar_dir):
    return data.load_cifar100(tiny_cifar_dir)


@pytest.fixture(autouse=True)
def _restore_cpu_threads():
    """A test that runs a script in-process (run_exp1.main, bench.main) starts the CPU
    thread pool; put the thread count back so that tests do not depend on their order."""
    from nn import backend
    before = backend.get_num_threads()
    yield
    if backend.get_num_threads() != before:
        backend.set_num_threads(before)
