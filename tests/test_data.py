"""Tests for data.py: loading/verification, synthetic set, tasks, TaskSet, download, montage, CLI."""

import contextlib
import dataclasses
import hashlib
import io
import json
import pickle
import shutil
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import data
from conftest import TINY_TEST_PER_CLASS, TINY_TRAIN_PER_CLASS
from tests.cli import usage_error

N_TR = 100 * TINY_TRAIN_PER_CLASS
N_TE = 100 * TINY_TEST_PER_CLASS


# ---------------------------------------------------------------- helpers


@pytest.fixture
def cifar_copy(tiny_cifar_dir, tmp_path):
    """A private copy of the tiny set that a test may damage."""
    dst = tmp_path / "copy"
    shutil.copytree(tiny_cifar_dir, dst)
    return dst


def _raw(root, name):
    with open(Path(root) / data.CIFAR100_DIRNAME / name, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _update_marker(root, name):
    """Make the marker agree with the current bytes of `name` (so only content checks can fail)."""
    d = Path(root) / data.CIFAR100_DIRNAME
    marker = json.loads((d / data.SYNTHETIC_MARKER).read_text())
    marker["md5"][name] = hashlib.md5((d / name).read_bytes()).hexdigest()
    marker["sizes"][name] = (d / name).stat().st_size
    (d / data.SYNTHETIC_MARKER).write_text(json.dumps(marker))


def _rewrite(root, name, mutate):
    d = _raw(root, name)
    mutate(d)
    with open(Path(root) / data.CIFAR100_DIRNAME / name, "wb") as f:
        pickle.dump(d, f, protocol=4)
    _update_marker(root, name)


def _load_error(root):
    with pytest.raises(data.DataError) as e:
        data.load_cifar100(root)
    return str(e.value)


# ---------------------------------------------------------------- loading


def test_loader_shapes_dtypes_counts(tiny_cifar):
    ds = tiny_cifar
    assert ds.synthetic is True
    assert ds.train_x.shape == (N_TR, 32, 32, 3) and ds.train_x.dtype == np.uint8
    assert ds.test_x.shape == (N_TE, 32, 32, 3) and ds.test_x.dtype == np.uint8
    assert ds.train_x.flags.c_contiguous and ds.test_x.flags.c_contiguous
    for y, n, per in ((ds.train_y, N_TR, TINY_TRAIN_PER_CLASS), (ds.test_y, N_TE, TINY_TEST_PER_CLASS)):
        assert y.dtype == np.int64 and y.shape == (n,)
        assert (np.bincount(y, minlength=100) == per).all()
    assert ds.train_coarse.dtype == np.int64
    assert (ds.train_coarse == ds.train_y // 5).all() and (ds.test_coarse == ds.test_y // 5).all()
    assert ds.fine_names == [f"fine_{i:02d}" for i in range(100)]
    assert ds.coarse_names == [f"coarse_{i:02d}" for i in range(20)]
    assert "synthetic" in repr(ds)


def test_pixels_round_trip_against_raw_planes(tiny_cifar_dir, tiny_cifar):
    for split, x, y in (("train", tiny_cifar.train_x, tiny_cifar.train_y),
                        ("test", tiny_cifar.test_x, tiny_cifar.test_y)):
        raw = _raw(tiny_cifar_dir, split)
        assert raw[b"fine_labels"] == y.tolist()
        for i in (0, 1, 17, len(y) - 1):
            row = raw[b"data"][i]
            for c in range(3):  # 1024 R, then 1024 G, then 1024 B, each 32x32 row-major
                plane = row[1024 * c:1024 * (c + 1)].reshape(32, 32)
                assert np.array_equal(x[i, :, :, c], plane)
            assert x[i, 3, 5, 1] == row[1024 + 3 * 32 + 5]


def test_synthetic_files_use_the_official_format(tiny_cifar_dir):
    for split, n, batch in (("train", N_TR, b"training batch 1 of 1"), ("test", N_TE, b"testing batch 1 of 1")):
        d = _raw(tiny_cifar_dir, split)
        assert set(d) == {b"batch_label", b"filenames", b"fine_labels", b"coarse_labels", b"data"}
        assert d[b"batch_label"] == batch
        assert d[b"data"].dtype == np.uint8 and d[b"data"].shape == (n, 3072)
        assert isinstance(d[b"fine_labels"], list) and isinstance(d[b"fine_labels"][0], int)
        assert isinstance(d[b"coarse_labels"], list) and len(d[b"coarse_labels"]) == n
        assert isinstance(d[b"filenames"][0], bytes) and d[b"filenames"][0].endswith(b".png")
    meta = _raw(tiny_cifar_dir, "meta")
    assert set(meta) == {b"fine_label_names", b"coarse_label_names"}
    assert meta[b"fine_label_names"][3] == b"fine_03" and len(meta[b"coarse_label_names"]) == 20
    marker = json.loads((tiny_cifar_dir / data.CIFAR100_DIRNAME / data.SYNTHETIC_MARKER).read_text())
    assert (marker["n_train"], marker["n_test"], marker["seed"]) == (N_TR, N_TE, 0)
    for name in data.CIFAR100_FILES:
        assert marker["md5"][name] == data.file_md5(tiny_cifar_dir / data.CIFAR100_DIRNAME / name)


def test_synthetic_is_deterministic_from_seed(tmp_path):
    def md5s(root):
        return {n: data.file_md5(root / data.CIFAR100_DIRNAME / n) for n in data.CIFAR100_FILES}

    a = data.write_synthetic_cifar100(tmp_path / "a", 3, 1, seed=7)
    b = data.write_synthetic_cifar100(tmp_path / "b", 3, 1, seed=7)
    c = data.write_synthetic_cifar100(tmp_path / "c", 3, 1, seed=8)
    assert a == tmp_path / "a"
    assert md5s(a) == md5s(b)
    assert md5s(a)["train"] != md5s(c)["train"]
    assert not list((tmp_path / "a" / data.CIFAR100_DIRNAME).glob(".*tmp*"))  # no temp files left


def test_synthetic_refuses_to_overwrite_a_real_set(cifar_copy):
    (cifar_copy / data.CIFAR100_DIRNAME / data.SYNTHETIC_MARKER).unlink()
    with pytest.raises(data.DataError, match="refusing to overwrite"):
        data.write_synthetic_cifar100(cifar_copy, 2, 1)


def test_synthetic_classes_differ_more_across_groups(tiny_cifar):
    # Class means of a coarse 4x4 colour grid: same-group classes are closer than different-group
    # classes on average (seed 0, so this is deterministic; about 0.62 on this tiny set).
    grid = tiny_cifar.train_x.reshape(N_TR, 4, 8, 4, 8, 3).mean(axis=(2, 4)).reshape(N_TR, -1)
    order = np.argsort(tiny_cifar.train_y, kind="stable")
    means = grid[order].reshape(100, TINY_TRAIN_PER_CLASS, -1).mean(1)
    d = ((means[:, None] - means[None]) ** 2).sum(-1)
    g = np.arange(100) // 5
    same = (g[:, None] == g[None]) & ~np.eye(100, dtype=bool)
    assert d[same].mean() < 0.75 * d[g[:, None] != g[None]].mean()


def test_load_dataset_synthetic_generates_once_and_regenerates_when_corrupt(tmp_path):
    ds = data.load_dataset("synthetic", tmp_path, seed=1, n_train_per_class=2, n_test_per_class=1, quiet=True)
    sub = tmp_path / "synthetic-1-2-1" / data.CIFAR100_DIRNAME
    assert ds.synthetic and len(ds.train_y) == 200 and len(ds.test_y) == 100
    stamp = (sub / "train").stat().st_mtime_ns
    data.load_dataset("synthetic", tmp_path, seed=1, n_train_per_class=2, n_test_per_class=1, quiet=True)
    assert (sub / "train").stat().st_mtime_ns == stamp  # reused, not regenerated
    (sub / "train").write_bytes(b"garbage")
    ds2 = data.load_dataset("synthetic", tmp_path, seed=1, n_train_per_class=2, n_test_per_class=1, quiet=True)
    assert np.array_equal(ds2.train_x, ds.train_x)
    with pytest.raises(data.DataError, match="unknown data source"):
        data.load_dataset("imagenet", tmp_path)


def test_synthetic_generation_stopped_midway_is_generated_again(tmp_path, monkeypatch):
    """Ctrl-C after the first file: the folder is marked as a synthetic set being written,
    so the next load writes it again (not refused as a real set), to the same bytes."""
    kw = dict(seed=1, n_train_per_class=2, n_test_per_class=1, quiet=True)
    sub = tmp_path / "synthetic-1-2-1" / data.CIFAR100_DIRNAME
    write = data._atomic_write_pickle

    def stop_at_test(path, obj):
        if path.name == "test":
            raise KeyboardInterrupt
        write(path, obj)
    monkeypatch.setattr(data, "_atomic_write_pickle", stop_at_test)
    with pytest.raises(KeyboardInterrupt):
        data.load_dataset("synthetic", tmp_path, **kw)
    assert (sub / "train").exists() and not (sub / data.SYNTHETIC_MARKER).exists()
    assert (sub / data.SYNTHETIC_PENDING).exists()
    monkeypatch.setattr(data, "_atomic_write_pickle", write)
    ds = data.load_dataset("synthetic", tmp_path, **kw)
    assert (sub / data.SYNTHETIC_MARKER).exists() and not (sub / data.SYNTHETIC_PENDING).exists()
    ref = data.load_dataset("synthetic", tmp_path / "fresh", **kw)
    assert np.array_equal(ds.train_x, ref.train_x) and np.array_equal(ds.test_x, ref.test_x)


@pytest.mark.parametrize("key,value", [("n_train", "200"), ("seed", 1.5), ("md5", ["a", "b", "c"]),
                                       ("sizes", {"train": "big"})])
def test_marker_with_wrong_value_types_is_a_data_error_and_regenerated(tmp_path, key, value):
    kw = dict(seed=1, n_train_per_class=2, n_test_per_class=1, quiet=True)
    ds = data.load_dataset("synthetic", tmp_path, **kw)
    marker = tmp_path / "synthetic-1-2-1" / data.CIFAR100_DIRNAME / data.SYNTHETIC_MARKER
    m = json.loads(marker.read_text())
    m[key] = value
    marker.write_text(json.dumps(m))
    with pytest.raises(data.DataError, match="unreadable synthetic-set marker"):
        data.load_cifar100(tmp_path / "synthetic-1-2-1")
    assert np.array_equal(data.load_dataset("synthetic", tmp_path, **kw).train_x, ds.train_x)


def test_default_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SUPERNET_DATA_DIR", str(tmp_path))
    assert data.default_data_dir() == tmp_path
    monkeypatch.delenv("SUPERNET_DATA_DIR")
    assert data.default_data_dir() == Path.home() / ".cache" / "supernet"


# ---------------------------------------------------------------- verification errors


def test_md5_mismatch_is_detected(cifar_copy):
    path = cifar_copy / data.CIFAR100_DIRNAME / "train"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside the pixel data
    path.write_bytes(bytes(raw))
    msg = _load_error(cifar_copy)
    assert str(path) in msg and "md5" in msg and "python data.py synthetic" in msg


def test_truncated_pickle_is_detected(cifar_copy):
    path = cifar_copy / data.CIFAR100_DIRNAME / "test"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _update_marker(cifar_copy, "test")  # md5 now matches: the unpickling must catch it
    msg = _load_error(cifar_copy)
    assert str(path) in msg and "truncated or corrupt" in msg


def test_missing_file_is_detected(cifar_copy):
    path = cifar_copy / data.CIFAR100_DIRNAME / "meta"
    path.unlink()
    msg = _load_error(cifar_copy)
    assert str(path) in msg and "missing" in msg and "python data.py synthetic" in msg


def test_missing_real_set_explains_how_to_get_it(tmp_path):
    msg = _load_error(tmp_path)
    assert str(tmp_path / data.CIFAR100_DIRNAME / "train") in msg
    assert "download=True" in msg and "by hand" in msg and "synthetic" in msg


def test_real_set_is_checked_against_official_sizes_and_md5(cifar_copy):
    (cifar_copy / data.CIFAR100_DIRNAME / data.SYNTHETIC_MARKER).unlink()  # now it claims to be the real set
    msg = _load_error(cifar_copy)
    assert str(cifar_copy / data.CIFAR100_DIRNAME / "train") in msg and "155,249,918" in msg


def test_official_constants_are_facts_md_s():
    """The URL, md5s and sizes as ../shared/reference/facts.md gives them: a typo in one
    would make every real download or load fail (or, worse, accept another file)."""
    assert data.CIFAR100_URL == "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    assert (data.CIFAR100_ARCHIVE_MD5, data.CIFAR100_ARCHIVE_SIZE) == ("eb9058c3a382ffc7106e4002c42a8d85", 169_001_437)
    assert data.CIFAR100_MD5 == {"train": "16019d7e3df5f24257cddd939b257f8d",
                                 "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
                                 "meta": "7973b15100ade9c7d40fb424638fde48"}
    assert data.CIFAR100_SIZES == {"train": 155_249_918, "test": 31_049_707}


def _relabel_one(d, fine=None, coarse=None):
    if fine is not None:
        d[b"fine_labels"][0] = fine
    if coarse is not None:
        d[b"coarse_labels"][0] = coarse


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: _relabel_one(d, fine=(d[b"fine_labels"][0] + 5) % 100, coarse=((d[b"fine_labels"][0] + 5) % 100) // 5),
     "images per fine class"),
    (lambda d: _relabel_one(d, coarse=(d[b"coarse_labels"][0] + 1) % 20), "more than one coarse label"),
])
def test_label_counts_and_fine_to_coarse_are_checked(cifar_copy, mutate, msg):
    _rewrite(cifar_copy, "train", mutate)
    err = _load_error(cifar_copy)
    assert str(cifar_copy / data.CIFAR100_DIRNAME / "train") in err and msg in err


def test_meta_with_a_name_missing_is_detected(cifar_copy):
    _rewrite(cifar_copy, "meta", lambda d: d[b"fine_label_names"].pop())
    err = _load_error(cifar_copy)
    assert str(cifar_copy / data.CIFAR100_DIRNAME / "meta") in err and "list of 100 names" in err


def test_wrong_array_shape_is_detected(cifar_copy):
    _rewrite(cifar_copy, "train", lambda d: d.__setitem__(b"data", d[b"data"].reshape(N_TR, 3, 1024)))
    msg = _load_error(cifar_copy)
    assert str(cifar_copy / data.CIFAR100_DIRNAME / "train") in msg and "(N, 3072)" in msg


def test_wrong_image_count_is_detected(cifar_copy):
    _rewrite(cifar_copy, "test", lambda d: d.__setitem__(b"data", d[b"data"][:-1]))
    msg = _load_error(cifar_copy)
    assert "test" in msg and f"{N_TE - 1} images, expected {N_TE}" in msg


def test_out_of_range_fine_labels_are_detected(cifar_copy):
    _rewrite(cifar_copy, "train", lambda d: d[b"fine_labels"].__setitem__(5, 100))
    msg = _load_error(cifar_copy)
    assert str(cifar_copy / data.CIFAR100_DIRNAME / "train") in msg and "fine_labels" in msg and "0..99" in msg


def test_out_of_range_coarse_labels_are_detected(cifar_copy):
    _rewrite(cifar_copy, "test", lambda d: d[b"coarse_labels"].__setitem__(0, -1))
    msg = _load_error(cifar_copy)
    assert "coarse_labels" in msg and "0..19" in msg


def test_missing_key_is_detected(cifar_copy):
    _rewrite(cifar_copy, "train", lambda d: d.pop(b"fine_labels"))
    assert "b'fine_labels'" in _load_error(cifar_copy)


def test_unsafe_pickle_is_refused(cifar_copy, tmp_path):
    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    path = cifar_copy / data.CIFAR100_DIRNAME / "meta"
    path.write_bytes(pickle.dumps({b"fine_label_names": Evil()}))
    _update_marker(cifar_copy, "meta")
    msg = _load_error(cifar_copy)
    assert str(path) in msg and "not allowed" in msg
    assert (tmp_path / "victim").exists()


def test_corrupt_marker_is_detected(cifar_copy, tmp_path):
    marker = cifar_copy / data.CIFAR100_DIRNAME / data.SYNTHETIC_MARKER
    marker.write_text("{not json")
    msg = _load_error(cifar_copy)
    assert str(marker) in msg
    # the settings were in the marker: the regenerate command asks for them
    assert (f"`python data.py synthetic --out {cifar_copy} --seed S --train-per-class N --test-per-class M` "
            f"(S, N, M: the seed and images per class it was made with)") in msg
    # a set made by load_dataset: its folder names the settings
    made = tmp_path / "synthetic-0-20-10"
    shutil.copytree(cifar_copy, made)
    assert (f"`python data.py synthetic --out {made} --seed 0 --train-per-class 20 --test-per-class 10`"
            in _load_error(made))


# ---------------------------------------------------------------- tasks


def test_exp1_tasks():
    t = data.exp1_tasks()
    assert len(t) == 99 and t[0] == (0, 99) and t[98] == (98, 99)
    assert t[5].class0 == 5 and t[5].class1 == 99 and isinstance(t[5], data.Task)


def test_exp2_tasks():
    t = data.exp2_tasks()
    assert len(t) == 100 and t[3] == (3, 53) and t[53] == (53, 3)
    assert t[0] == (0, 50) and t[49] == (49, 99) and t[50] == (50, 0) and t[99] == (99, 49)
    assert all(t[i] == (t[i + 50].class1, t[i + 50].class0) for i in range(50))


def test_pair_tasks_validation():
    assert data.pair_tasks([(1, 2), [3, 4]]) == [(1, 2), (3, 4)]
    for bad, match in (([(1, 1)], "both 1"), ([(0, 100)], "outside 0..99"), ([(-1, 3)], "outside"),
                       ([(1,)], "not a"), ([(1.5, 2)], "not an integer"), ([], "empty")):
        with pytest.raises(data.TaskSpecError, match=match):
            data.pair_tasks(bad)
    with pytest.raises(ValueError):  # TaskSpecError is also a ValueError (argparse-friendly)
        data.pair_tasks([(2, 2)])


def test_parse_task_range():
    assert data.parse_task_range("90-98") == list(range(90, 99))
    assert data.parse_task_range("1,5,7-9") == [1, 5, 7, 8, 9]
    assert data.parse_task_range(" 3 , 1-2,3") == [1, 2, 3]
    for bad in ("", "a", "5-2", "-3", "3-", "1,,2", "1-2-3"):
        with pytest.raises(data.TaskSpecError):
            data.parse_task_range(bad)
    with pytest.raises(data.TaskSpecError, match="out of range"):
        data.parse_task_range("95-99", n_tasks=99)


# ---------------------------------------------------------------- TaskSet


@pytest.fixture(scope="module")
def exp1_set(tiny_cifar):
    return data.TaskSet(tiny_cifar, data.exp1_tasks())


@pytest.fixture(scope="module")
def exp2_set(tiny_cifar):
    return data.TaskSet(tiny_cifar, data.exp2_tasks())


def test_taskset_counts(exp1_set, exp2_set):
    assert len(exp1_set) == 99 and len(exp2_set) == 100 and exp1_set.tasks[98] == (98, 99)
    assert exp1_set.n_train(0) == 2 * TINY_TRAIN_PER_CLASS and exp1_set.n_test(0) == 2 * TINY_TEST_PER_CLASS
    with pytest.raises(data.TaskSpecError):
        exp1_set.n_train(99)


def test_sample_batch_shapes_grouping_and_labels(exp2_set, tiny_cifar):
    ids = [53, 3, 7]
    per = 16
    x, y, task = exp2_set.sample_batch(np.random.default_rng(0), ids, per)
    assert x.shape == (len(ids) * per, 32, 32, 3) and x.dtype == np.float32
    assert y.shape == (len(ids) * per,) and y.dtype == np.float32
    assert task.dtype == np.int64 and task.tolist() == np.repeat(ids, per).tolist()
    idx, y2, task2 = exp2_set.sample_indices(np.random.default_rng(0), ids, per)
    assert np.array_equal(y, y2) and np.array_equal(task, task2)
    # the batch holds exactly those (normalised) images
    assert np.array_equal(x, exp2_set.normalize(tiny_cifar.train_x[idx]))
    # label 1 exactly for class1's images, per task group
    fine = tiny_cifar.train_y[idx]
    for k, t in enumerate(ids):
        c0, c1 = exp2_set.tasks[t]
        sl = slice(k * per, (k + 1) * per)
        assert set(fine[sl]) <= {c0, c1}
        assert np.array_equal(y[sl] == 1, fine[sl] == c1)
    # task 3 = (3, 53) and task 53 = (53, 3): the same images get opposite labels
    i3, l3 = exp2_set.indices(3)
    i53, l53 = exp2_set.indices(53)
    assert set(i3.tolist()) == set(i53.tolist())
    assert (tiny_cifar.train_y[i3][l3 == 1] == 53).all() and (tiny_cifar.train_y[i53][l53 == 1] == 3).all()


def test_exp1_labels_on_all_tasks(exp1_set, tiny_cifar):
    idx, y, task = exp1_set.sample_indices(np.random.default_rng(1), np.arange(99), 8)
    fine = tiny_cifar.train_y[idx]
    assert np.array_equal(y == 1, fine == 99)
    assert np.array_equal(fine[y == 0], task[y == 0])  # label 0 is class i in task i


def test_sample_batch_reproducible(exp1_set):
    a = exp1_set.sample_batch(np.random.default_rng(42), [0, 5], 10)
    b = exp1_set.sample_batch(np.random.default_rng(42), [0, 5], 10)
    c = exp1_set.sample_batch(np.random.default_rng(43), [0, 5], 10)
    for u, v in zip(a, b):
        assert np.array_equal(u, v)
    assert not np.array_equal(a[0], c[0])
    with pytest.raises(data.TaskSpecError):
        exp1_set.sample_batch(np.random.default_rng(0), [99], 4)


def test_train_and_test_never_share_images(exp1_set, tiny_cifar):
    for t in (0, 50, 98):
        tr, _ = exp1_set.indices(t, "train")
        te, _ = exp1_set.indices(t, "test")
        assert tr.max() < len(tiny_cifar.train_x) and te.max() < len(tiny_cifar.test_x)
        train_bytes = {tiny_cifar.train_x[i].tobytes() for i in tr}
        assert not any(tiny_cifar.test_x[i].tobytes() in train_bytes for i in te)
        assert set(tiny_cifar.test_y[te]) == set(exp1_set.tasks[t])


def test_normalisation_uses_train_statistics_only(tiny_cifar, exp1_set):
    ref = tiny_cifar.train_x.astype(np.float64)
    np.testing.assert_allclose(exp1_set.mean, ref.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(exp1_set.std, ref.std(axis=(0, 1, 2)), rtol=1e-6)
    assert exp1_set.mean.dtype == np.float32 and exp1_set.std.dtype == np.float32
    changed = dataclasses.replace(tiny_cifar, test_x=np.full_like(tiny_cifar.test_x, 255))
    ts = data.TaskSet(changed, data.exp1_tasks())
    assert np.array_equal(ts.mean, exp1_set.mean) and np.array_equal(ts.std, exp1_set.std)
    x, _ = ts.test_arrays(0)
    np.testing.assert_allclose(x[0, 0, 0], (255 - exp1_set.mean) / exp1_set.std, rtol=1e-6)


def test_train_test_arrays_and_eval_batches(exp1_set, tiny_cifar):
    x, y = exp1_set.train_arrays(4)
    idx, lab = exp1_set.indices(4, "train")
    assert x.shape == (2 * TINY_TRAIN_PER_CLASS, 32, 32, 3) and x.dtype == np.float32 and y.dtype == np.float32
    np.testing.assert_allclose(x, (tiny_cifar.train_x[idx] - exp1_set.mean) / exp1_set.std, rtol=1e-5, atol=1e-6)
    assert np.array_equal(y, lab) and y.sum() == TINY_TRAIN_PER_CLASS
    xt, yt = exp1_set.test_arrays(4)
    chunks = list(exp1_set.eval_batches(4, "test", batch_size=7))
    assert [len(c[1]) for c in chunks] == [7, 7, 6]
    assert np.array_equal(np.concatenate([c[0] for c in chunks]), xt)
    assert np.array_equal(np.concatenate([c[1] for c in chunks]), yt)


def test_augmentation_keeps_shapes_is_seeded_and_is_a_crop_or_flip(tiny_cifar):
    ts = data.TaskSet(tiny_cifar, [(1, 2)], augment=True)
    a = ts.sample_batch(np.random.default_rng(5), [0], 64)
    b = ts.sample_batch(np.random.default_rng(5), [0], 64)
    plain = ts.sample_batch(np.random.default_rng(5), [0], 64, augment=False)
    assert a[0].shape == (64, 32, 32, 3) and a[0].dtype == np.float32
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], plain[1])
    assert not np.array_equal(a[0], plain[0])
    # every augmented image is a 32x32 window of the zero-padded (optionally flipped) original
    imgs = tiny_cifar.train_x[:20]
    out = data.augment_batch(imgs, np.random.default_rng(0))
    assert out.shape == imgs.shape and out.dtype == np.uint8
    padded = np.pad(imgs, ((0, 0), (4, 4), (4, 4), (0, 0)))
    for i in range(len(imgs)):
        windows = [p[dy:dy + 32, dx:dx + 32] for p in (padded[i], padded[i][:, ::-1])
                   for dy in range(9) for dx in range(9)]
        assert any(np.array_equal(out[i], w) for w in windows)


# ---------------------------------------------------------------- download


@pytest.fixture(scope="module")
def mini_dir(tmp_path_factory):
    """A very small synthetic set (2 train / 1 test per class) to pack into tarballs quickly."""
    return data.write_synthetic_cifar100(tmp_path_factory.mktemp("mini"), 2, 1, seed=5)


def _make_tarball(src_root, path, extra=None):
    with tarfile.open(path, "w:gz", compresslevel=1) as tf:
        tf.add(src_root / data.CIFAR100_DIRNAME, arcname=data.CIFAR100_DIRNAME)
        if extra:
            info = tarfile.TarInfo(extra)
            info.size = 4
            tf.addfile(info, io.BytesIO(b"evil"))
    return path, data.file_md5(path)


def test_download_via_file_url(mini_dir, tmp_path):
    tgz, md5 = _make_tarball(mini_dir, tmp_path / "c.tar.gz")
    dd = tmp_path / "dd"
    dd.mkdir()
    (dd / (data.CIFAR100_ARCHIVE + ".part")).write_bytes(b"stale partial bytes")  # file:// ignores Range
    out = data.download_cifar100(dd, url=tgz.as_uri(), quiet=True, md5=md5)
    assert out == dd / data.CIFAR100_DIRNAME
    assert (dd / data.CIFAR100_ARCHIVE).exists() and not (dd / (data.CIFAR100_ARCHIVE + ".part")).exists()
    ds = data.load_cifar100(dd)
    assert np.array_equal(ds.train_x, data.load_cifar100(mini_dir).train_x)
    # a verified archive already in place is reused without touching the network
    shutil.rmtree(dd / data.CIFAR100_DIRNAME)
    data.download_cifar100(dd, url="http://127.0.0.1:9/nowhere", quiet=True, md5=md5)
    assert (dd / data.CIFAR100_DIRNAME / "train").exists()


def test_download_md5_mismatch_leaves_nothing_valid(mini_dir, tmp_path):
    tgz, _ = _make_tarball(mini_dir, tmp_path / "c.tar.gz")
    dd = tmp_path / "dd"
    with pytest.raises(data.DataError) as e:
        data.download_cifar100(dd, url=tgz.as_uri(), quiet=True, md5="0" * 32)
    assert "md5" in str(e.value) and "deleted" in str(e.value)
    assert not (dd / data.CIFAR100_ARCHIVE).exists()
    assert not (dd / (data.CIFAR100_ARCHIVE + ".part")).exists()
    assert not (dd / data.CIFAR100_DIRNAME).exists()


def test_a_bad_archive_placed_by_hand_is_kept_and_named(mini_dir, tmp_path, capsys):
    """An archive with the wrong md5 (a copy cut short) is moved aside, not deleted, even
    quietly; the download then runs, and if it fails its message says where the file went."""
    tgz, md5 = _make_tarball(mini_dir, tmp_path / "c.tar.gz")
    dd = tmp_path / "dd"
    dd.mkdir()
    cut = tgz.read_bytes()[:1000]
    (dd / data.CIFAR100_ARCHIVE).write_bytes(cut)
    with pytest.raises(data.DataError) as e:
        data.download_cifar100(dd, url="http://127.0.0.1:9/nowhere", quiet=True, md5=md5)
    bad = dd / (data.CIFAR100_ARCHIVE + ".bad")
    assert bad.read_bytes() == cut and not (dd / data.CIFAR100_ARCHIVE).exists()
    assert f"moved to {bad}" in str(e.value) and "1,000 bytes" in str(e.value)
    assert f"moved to {bad}" in capsys.readouterr().err
    # with the right file reachable, the download replaces it and the set loads; the earlier
    # .bad is kept beside the new one
    (dd / data.CIFAR100_ARCHIVE).write_bytes(cut[:500])
    assert data.download_cifar100(dd, url=tgz.as_uri(), quiet=True, md5=md5) == dd / data.CIFAR100_DIRNAME
    assert data.file_md5(dd / data.CIFAR100_ARCHIVE) == md5 and bad.read_bytes() == cut
    assert (dd / (data.CIFAR100_ARCHIVE + ".bad1")).read_bytes() == cut[:500]


def test_download_without_network_explains_alternatives(tmp_path):
    with pytest.raises(data.DataError) as e:
        data.download_cifar100(tmp_path, url=(tmp_path / "nope.tar.gz").as_uri(), quiet=True)
    msg = str(e.value)
    assert "Could not download" in msg and "by hand" in msg and "--data synthetic" in msg
    assert str(tmp_path / data.CIFAR100_ARCHIVE) in msg


def test_download_rejects_unsafe_tar_members(mini_dir, tmp_path):
    tgz, md5 = _make_tarball(mini_dir, tmp_path / "c.tar.gz", extra="../escaped")
    dd = tmp_path / "dd"
    with pytest.raises(data.DataError, match="unsafe member"):
        data.download_cifar100(dd, url=tgz.as_uri(), quiet=True, md5=md5)
    assert not (tmp_path / "escaped").exists() and not (dd / data.CIFAR100_DIRNAME).exists()


class _RangeHandler(BaseHTTPRequestHandler):
    payload = b""
    seen_ranges = []
    wrong_offset = False          # answer a Range request with 206 from byte 0
    cut_at = None                 # stop sending after this many bytes of the body (a dropped connection)

    def do_GET(self):  # noqa: N802
        rng = self.headers.get("Range")
        type(self).seen_ranges.append(rng)
        start = int(rng.split("=")[1].rstrip("-")) if rng and not self.wrong_offset else 0
        body = self.payload[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(self.payload) - 1}/{len(self.payload)}")
        self.end_headers()
        self.wfile.write(body if self.cut_at is None else body[:self.cut_at])
        if self.cut_at is not None:
            self.close_connection = True

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _range_server(payload, wrong_offset=False, cut_at=None):
    """A local HTTP server of payload (_RangeHandler, its settings as given and a fresh
    log of the Range headers it saw), shut down on exit; yields the archive's URL."""
    _RangeHandler.payload, _RangeHandler.seen_ranges = payload, []
    _RangeHandler.wrong_offset, _RangeHandler.cut_at = wrong_offset, cut_at
    try:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    except OSError:
        pytest.skip("cannot bind a local port")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/cifar-100-python.tar.gz"
    finally:
        _RangeHandler.cut_at = None
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("wrong_offset", [False, True])
def test_download_resumes_with_http_range(mini_dir, tmp_path, wrong_offset):
    """A .part is resumed from its end; a 206 for another offset than asked is not appended
    to it (the download starts over instead)."""
    tgz, md5 = _make_tarball(mini_dir, tmp_path / "c.tar.gz")
    payload = tgz.read_bytes()
    dd = tmp_path / "dd"
    dd.mkdir()
    half = len(payload) // 2
    (dd / (data.CIFAR100_ARCHIVE + ".part")).write_bytes(payload[:half])
    with _range_server(payload, wrong_offset=wrong_offset) as url:
        data.download_cifar100(dd, url=url, quiet=True, md5=md5)
    assert _RangeHandler.seen_ranges == [f"bytes={half}-"] + ([None] if wrong_offset else [])
    assert data.file_md5(dd / data.CIFAR100_ARCHIVE) == md5
    assert data.load_cifar100(dd).synthetic


def test_a_dropped_download_keeps_its_part_and_the_next_call_resumes_it(mini_dir, tmp_path):
    tgz, md5 = _make_tarball(mini_dir, tmp_path / "c.tar.gz")
    payload = tgz.read_bytes()
    dd = tmp_path / "dd"
    part = dd / (data.CIFAR100_ARCHIVE + ".part")
    with _range_server(payload, cut_at=len(payload) // 3) as url:
        with pytest.raises(data.DataError, match="is kept|stopped at"):
            data.download_cifar100(dd, url=url, quiet=True, md5=md5)
        assert part.read_bytes() == payload[:len(payload) // 3]        # not deleted by the md5 check
        _RangeHandler.cut_at = None
        data.download_cifar100(dd, url=url, quiet=True, md5=md5)
    assert _RangeHandler.seen_ranges == [None, f"bytes={len(payload) // 3}-"]
    assert data.file_md5(dd / data.CIFAR100_ARCHIVE) == md5 and not part.exists()


# ---------------------------------------------------------------- montage and CLI


def test_montage_png(tiny_cifar, tmp_path):
    from PIL import Image

    path = data.save_task_montage(tmp_path / "sub" / "m.png", tiny_cifar, data.exp2_tasks()[3])
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == data.montage_size(8, 3) == (4 + 8 * (96 + 4), 4 + 2 * (16 + 96 + 4))
        # first class0 tile (task 3 -> class 3) is the first class-3 training image, scaled 3x
        first = np.flatnonzero(tiny_cifar.train_y == 3)[0]
        tile = np.asarray(im)[4 + 16:4 + 16 + 96, 4:4 + 96]
        assert np.array_equal(tile[::3, ::3], tiny_cifar.train_x[first])


def test_cli_check_and_errors(tiny_cifar_dir, tmp_path, capsys):
    assert data.main(["check", "--data-dir", str(tiny_cifar_dir)]) == 0
    out = capsys.readouterr().out
    assert f"train: {N_TR} images" in out and "synthetic" in out and "OK" in out
    assert data.main(["check", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and "train" in err


def test_cli_synthetic_and_montage(tmp_path, capsys):
    assert data.main(["synthetic", "--out", str(tmp_path / "s"), "--train-per-class", "2",
                      "--test-per-class", "1", "--seed", "3"]) == 0
    assert data.load_cifar100(tmp_path / "s").train_x.shape == (200, 32, 32, 3)
    png = tmp_path / "t.png"
    assert data.main(["montage", "--data", "synthetic", "--data-dir", str(tmp_path), "--task-set", "exp2",
                      "--task", "53", "--out", str(png), "--train-per-class", "2", "--test-per-class", "1",
                      "--n-per-class", "2"]) == 0
    assert png.exists() and "(53, 3)" in capsys.readouterr().out
    # default --n-per-class: 8, or fewer when the split has fewer images per class
    assert data.main(["montage", "--data-dir", str(tmp_path), "--out", str(png), "--split", "test",
                      "--train-per-class", "2", "--test-per-class", "1"]) == 0
    from PIL import Image
    with Image.open(png) as im:
        assert im.size == data.montage_size(1)


MONTAGE = ["montage", "--train-per-class", "2", "--test-per-class", "1"]


@pytest.mark.parametrize("args,message", [
    (["--n-per-class", "0"], "argument --n-per-class: must be >= 1, got 0"),
    (["--n-per-class", "-1"], "argument --n-per-class: must be >= 1, got -1"),
    (["--n-per-class", "3"], "--n-per-class 3: the train split has 2 images per class"),
    (["--n-per-class", "2", "--split", "test"], "--n-per-class 2: the test split has 1 images per class"),
    (["--n-per-class", "501", "--data", "cifar100"], "--n-per-class 501: the train split has 500 images per class"),
    (["--task", "99"], "--task 99 is out of range for exp1 (0..98)"),
    (["--task", "-1", "--task-set", "exp2"], "--task -1 is out of range for exp2 (0..99)"),
    (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["--train-per-class", "0"], "argument --train-per-class: must be >= 1, got 0"),
    (["--test-per-class", "1.5"], "argument --test-per-class: '1.5' is not an integer"),
    (["--out", "{tmp}/task.txt"], "--out {tmp}/task.txt: the name must end in an image extension Pillow can "
                                  "write (e.g. .png)"),
    (["--out", "{tmp}/task"], "--out {tmp}/task: the name must end in an image extension Pillow can write "
                              "(e.g. .png)"),
    (["--out", "{tmp}/dir.png"], "--out {tmp}/dir.png: is a directory"),
    (["--out", "{tmp}/file/x.png"], "--out {tmp}/file/x.png: {tmp}/file is not a folder"),
])
def test_cli_montage_options_are_checked_before_loading(tmp_path, capsys, args, message):
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "file").write_text("kept")
    data_dir = tmp_path / "data"
    argv = MONTAGE + ["--data-dir", str(data_dir), "--out", str(tmp_path / "t.png")]
    err = usage_error(capsys, data.main, argv + [a.format(tmp=tmp_path) for a in args])
    assert err == "python data.py montage: error: " + message.format(tmp=tmp_path)
    assert not data_dir.exists()                      # nothing loaded, generated or downloaded
    assert (tmp_path / "file").read_text() == "kept"


@pytest.mark.parametrize("args,message", [
    (["--train-per-class", "0"], "argument --train-per-class: must be >= 1, got 0"),
    (["--test-per-class", "-5"], "argument --test-per-class: must be >= 1, got -5"),
    (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
])
def test_cli_synthetic_options_are_checked(tmp_path, capsys, args, message):
    err = usage_error(capsys, data.main, ["synthetic", "--out", str(tmp_path / "s")] + args)
    assert err == "python data.py synthetic: error: " + message
    assert not (tmp_path / "s").exists()


def test_cli_montage_write_failure_is_one_line(tmp_path, capsys, monkeypatch):
    def fail(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(data, "save_task_montage", fail)
    png = tmp_path / "t.png"
    assert data.main(MONTAGE + ["--data-dir", str(tmp_path), "--out", str(png)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"error: {png}: cannot write the montage") and "Traceback" not in err
