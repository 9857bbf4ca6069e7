"""CIFAR-100 data for SuperNet: download, verify, load, synthetic stand-in, tasks.

Everything here is host-side NumPy (plus Pillow for montages, stdlib for the
rest); callers move batches to the GPU themselves.

Where the data lives
--------------------
``DEFAULT_DATA_DIR`` is ``$SUPERNET_DATA_DIR`` if set, else ``~/.cache/supernet``.
A *data_dir* holds the dataset as ``<data_dir>/cifar-100-python/{train,test,meta}``,
exactly as extracted from the official archive
https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (169,001,437 bytes).
Each file is a Python pickle (read with ``encoding='bytes'``) of a dict:
``b'data'`` uint8 ``(N, 3072)`` (1024 R, then 1024 G, then 1024 B values, each
a 32x32 image row-major), ``b'fine_labels'`` (0..99), ``b'coarse_labels'``
(0..19), ``b'filenames'``, ``b'batch_label'``; ``meta`` holds
``b'fine_label_names'`` and ``b'coarse_label_names'``. The real set has 500
train and 100 test images per fine class (50,000 / 10,000).

Failures a user can act on raise :class:`DataError`, whose message names the
file and says what to do (re-download, place files by hand, regenerate, or
use ``--data synthetic``).

Download (:func:`download_cifar100`)
    urllib download to ``<archive>.part`` with a progress bar on stderr,
    resumed with an HTTP Range request when a ``.part`` exists (restarted when
    the server ignores the Range); the archive's md5 is checked *before*
    anything is extracted, then the archive is moved into place atomically and
    extracted with member checks (no absolute paths, no ``..``, no links).
    A tarball fetched on another machine and copied to
    ``<data_dir>/cifar-100-python.tar.gz`` is verified and used as is.

Loading (:func:`load_cifar100`, :func:`load_dataset`)
    Each file's md5 is checked (1 MiB chunks) against the official md5s, or,
    for a synthetic set, against the md5s its generator recorded in
    ``cifar-100-python/SYNTHETIC.json`` (with the expected counts and seed), so
    the same code reads both and corruption of either is caught. Then the
    pickle is loaded (files that are not md5-verified official files go
    through an unpickler that only allows the NumPy array constructors) and
    its keys, dtype, shape ``(N, 3072)``, counts and label ranges are checked.
    Images become ``(N, 32, 32, 3)`` uint8 NHWC with one vectorised
    reshape/transpose/copy.

Synthetic CIFAR-100 (:func:`write_synthetic_cifar100`)
    Writes the three pickles in the official format (pickle protocol 5, bytes
    keys, lists of ints for labels, bytes filenames and names) plus the
    marker. It is deterministic from the seed, and 60,000 images take a few
    seconds. Fine class ``c`` belongs to coarse group ``c // 5`` (the real
    CIFAR-100 uses a different, fixed mapping; nothing here relies on one).

    What the images look like: a striped, textured background in one hue
    with a soft coloured ellipse ("object") near the centre, sometimes a
    second random-coloured blob, under random lighting and mild grain.

    * Each of the 20 coarse groups has a prototype: a background colour A
      and its darker shade B (same hue), two oriented sinusoidal gratings
      (orientation, frequency 2.5-7 cycles per image) whose sum mixes A and
      B, an object colour C and an ellipse shape (radius, aspect, angle).
    * The 5 fine classes of a group sit on a circle around the prototype in
      (orientation, log-frequency) space of both gratings, so any two classes
      of a group differ by a fixed minimum amount, with small per-class shifts
      of the colours A and C and of the ellipse shape. Classes of the same
      group are therefore more alike than classes of different groups, whose
      palettes, textures and shapes are drawn independently.
    * Each image draws grating phases (a random translation of the texture),
      jitter of orientation / frequency / object colour / angle / size, an
      object position (sd 3 px) and opacity, a clutter blob of random colour
      (60% of images), contrast (0.3-1), per-channel gain, brightness and
      pixel noise (sd 0.08 of the range, mostly shared by the channels), and
      is then quantised to uint8.
    * Cue swap: with probability 0.25 each, an image's background
      (palette + texture) and its object (colour + shape) are drawn for a
      random class instead of its own, so some images are ambiguous and no
      classifier reaches 100%.

    The class signal is partly linear (mean colours, object shape) and
    partly visible only to nonlinear, translation-tolerant features
    (grating orientation / frequency under random phase), which a CNN can
    learn. Measured with ridge regression on raw pixels (full-size set,
    seed 0, 10 pairs): about 66% on same-group pairs and 78% on
    different-group pairs; ridge on random conv features gets about 76% /
    85%. The knobs are in ``_SYN``.

Tasks (:data:`Task`, :func:`exp1_tasks`, :func:`exp2_tasks`, :func:`pair_tasks`)
    A task is a pair of fine classes: ``Task(class0, class1)``; images of
    ``class0`` get label 0, those of ``class1`` label 1. exp1: ``T_i =
    (i, 99)`` for i = 0..98. exp2: task i = ``(i, i+50)`` and task 50+i =
    ``(i+50, i)`` for i < 50 (the same pair with the labels swapped).
    :func:`parse_task_range` turns "90-98" or "1,5,7-9" into a list of ints.

Batches (:class:`TaskSet`)
    Stores index arrays per task into the dataset's uint8 arrays (no image
    copies). Train indices come from the train split only, test indices from
    the test split only. Per-channel mean/std come from the whole *training*
    split (exact, float64 histogram), stored as float32; batches are
    normalised on the fly to float32 NHWC ``(x - mean) / std``.
    ``sample_batch`` draws with replacement, grouped by task, from a NumPy
    Generator (reproducible); optional augmentation is a random crop with
    4 pixels of zero (black, before normalisation) padding and a random
    horizontal flip.

Command line::

    python data.py synthetic --out DIR [--train-per-class 500 --test-per-class 100 --seed 0]
    python data.py download --data-dir DIR
    python data.py check --data-dir DIR
    python data.py montage --data synthetic --data-dir DIR --task-set exp1 --task 0 --out task0.png
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import http.client
import json
import os
import pickle
import re
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections import namedtuple
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, Sequence

import numpy as np

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR100_ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_ARCHIVE_SIZE = 169_001_437
CIFAR100_DIRNAME = "cifar-100-python"
CIFAR100_FILES = ("train", "test", "meta")
CIFAR100_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
CIFAR100_SIZES = {"train": 155_249_918, "test": 31_049_707}  # meta: not checked by size
N_TRAIN = 50_000
N_TEST = 10_000
N_FINE = 100
N_COARSE = 20
SYNTHETIC_MARKER = "SYNTHETIC.json"
SYNTHETIC_PENDING = "SYNTHETIC.pending"   # a synthetic set being written (or whose writing was stopped)
SYNTHETIC_FORMAT = "supernet-synthetic-cifar100"
SYNTHETIC_VERSION = 1

_MiB = 1 << 20


def default_data_dir() -> Path:
    """``$SUPERNET_DATA_DIR`` if set, else ``~/.cache/supernet`` (read at call time)."""
    env = os.environ.get("SUPERNET_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "supernet"


DEFAULT_DATA_DIR = default_data_dir()


class DataError(RuntimeError):
    """A data problem the user can fix; the message names the file and the fix."""


class TaskSpecError(DataError, ValueError):
    """A bad task / class / range specification (also a ValueError, for argparse)."""


def _hint_obtain(data_dir: Path, download_failed: bool = False) -> str:
    root = Path(data_dir) / CIFAR100_DIRNAME
    first = ("" if download_failed else
             f"  * download it: load_cifar100(..., download=True) or `python data.py download --data-dir {data_dir}`;\n")
    return (
        "To get the data, either:\n" + first +
        f"  * {'or ' if first else ''}fetch {CIFAR100_URL} elsewhere ({CIFAR100_ARCHIVE_SIZE:,} bytes, md5 {CIFAR100_ARCHIVE_MD5}) "
        f"and copy it to {Path(data_dir) / CIFAR100_ARCHIVE}, then run the download command (it verifies and extracts it);\n"
        f"  * or place the extracted files by hand as {root}/train, {root}/test, {root}/meta;\n"
        f"  * or use synthetic data instead: `--data synthetic` (or `python data.py synthetic --out {data_dir}`)."
    )


# --------------------------------------------------------------------------
# Small file helpers
# --------------------------------------------------------------------------


def file_md5(path: str | os.PathLike, chunk_size: int = _MiB) -> str:
    """Hex md5 of a file, read in 1 MiB chunks."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_size)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    """write(f) into a temporary file beside `path`, flushed to disk, then renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    _atomic_write(path, lambda f: f.write(payload))


def _atomic_write_pickle(path: Path, obj) -> None:
    # protocol 5: NumPy writes the pixel buffer without a copy
    _atomic_write(path, lambda f: pickle.dump(obj, f, protocol=5))


# Only these globals may appear in a pickle that is not an md5-verified
# official file: the NumPy array constructors (old and new module names) and
# the bytes helper that protocol <= 2 pickles use. Nothing else can execute.
_SAFE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-100 pickle")
        return super().find_class(module, name)


def _load_pickle(path: Path, trusted: bool, fix: str) -> dict:
    try:
        with open(path, "rb") as f:
            if trusted:
                obj = pickle.load(f, encoding="bytes")
            else:
                obj = _SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError, OverflowError, MemoryError) as e:
        raise DataError(f"{path}: cannot unpickle ({type(e).__name__}: {e}); the file is truncated or "
                        f"corrupt. Delete it and {fix}.") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}; the file is corrupt. "
                        f"Delete it and {fix}.")
    return obj


# --------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------


class _Progress:
    """A one-line progress bar on stderr (bytes and percent), throttled."""

    def __init__(self, label: str, total: int | None, done: int = 0, quiet: bool = False):
        self.label, self.total, self.done, self.quiet = label, total, done, quiet
        self._last = 0.0
        self._t0 = time.monotonic()
        self._start = done

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if not self.quiet and now - self._last >= 0.2:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        mb = self.done / 1e6
        rate = (self.done - self._start) / max(now - self._t0, 1e-9) / 1e6
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(30 * frac)
            msg = f"\r{self.label} [{bar:<30}] {100 * frac:5.1f}% {mb:7.1f}/{self.total / 1e6:.1f} MB {rate:5.1f} MB/s"
        else:
            msg = f"\r{self.label} {mb:7.1f} MB {rate:5.1f} MB/s"
        sys.stderr.write(msg)
        sys.stderr.flush()

    def close(self) -> None:
        if not self.quiet:
            self._draw(time.monotonic())
            sys.stderr.write("\n")
            sys.stderr.flush()


def _size_note(path: Path) -> str:
    """'N bytes' of a file, with the official archive's size beside it when they differ."""
    n = path.stat().st_size
    return f"{n:,} bytes" + ("" if n == CIFAR100_ARCHIVE_SIZE else f", the official archive has {CIFAR100_ARCHIVE_SIZE:,}")


def _fetch(url: str, part: Path, quiet: bool, timeout: float) -> None:
    """Download url into part, resuming with a Range request if part exists."""
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "supernet-data/1"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # range not satisfiable: the .part is already complete
            return
        raise
    with resp:
        status = getattr(resp, "status", None) or resp.getcode()
        rng = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range") or "")
        if have and status == 206 and rng and int(rng.group(1)) == have:
            mode = "ab"
        else:  # fresh download, or the server ignored the Range header (or answered another one): start over
            if have and status == 206:
                resp.close()
                part.unlink()
                return _fetch(url, part, quiet, timeout)
            mode, have = "wb", 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        bar = _Progress(f"downloading {part.name[:-len('.part')]}", total, have, quiet)
        with open(part, mode) as f:
            while True:
                block = resp.read(_MiB)
                if not block:
                    break
                f.write(block)
                bar.update(len(block))
        bar.close()
    size = part.stat().st_size
    if total is not None and size != total:
        raise DataError(f"{part}: download stopped at {size:,} of {total:,} bytes. Run the download again "
                        f"to resume it.")


def _safe_extract(archive: Path, data_dir: Path, quiet: bool = False) -> Path:
    """Extract the CIFAR-100 tarball into data_dir/cifar-100-python, refusing unsafe members."""
    try:
        tf = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{archive}: not a readable tar archive ({e}). Delete it and download again.") from None
    with tf:
        members = tf.getmembers()
        for m in members:
            p = PurePosixPath(m.name)
            if m.name.startswith(("/", "\\")) or p.is_absolute() or ".." in p.parts or ":" in m.name:
                raise DataError(f"{archive}: unsafe member path {m.name!r}; refusing to extract. "
                                f"Delete the archive and download it again from {CIFAR100_URL}.")
            if not (m.isfile() or m.isdir()):
                raise DataError(f"{archive}: member {m.name!r} is a link or special file; refusing to "
                                f"extract. Delete the archive and download it again.")
            if not p.parts or p.parts[0] != CIFAR100_DIRNAME:
                raise DataError(f"{archive}: unexpected member {m.name!r} (everything should be under "
                                f"{CIFAR100_DIRNAME}/). Is this the CIFAR-100 python archive?")
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=data_dir))
        try:
            if not quiet:
                print(f"extracting {archive} ...", file=sys.stderr)
            if hasattr(tarfile, "data_filter"):
                tf.extractall(tmp, members=members, filter="data")
            else:  # pragma: no cover - older Pythons; members were checked above
                tf.extractall(tmp, members=members)
            src = tmp / CIFAR100_DIRNAME
            dst = data_dir / CIFAR100_DIRNAME
            if dst.exists():
                old = data_dir / f".{CIFAR100_DIRNAME}.old-{os.getpid()}"
                os.replace(dst, old)
                shutil.rmtree(old, ignore_errors=True)
                if not quiet:
                    print(f"replaced the previous contents of {dst}", file=sys.stderr)
            os.replace(src, dst)
        except (OSError, tarfile.TarError) as e:
            raise DataError(f"{archive}: extraction into {data_dir} failed ({e}). Check free disk space and "
                            f"permissions, then run the download again (the verified archive is reused).") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return data_dir / CIFAR100_DIRNAME


def download_cifar100(data_dir: str | os.PathLike | None = None, url: str = CIFAR100_URL,
                      quiet: bool = False, *, md5: str = CIFAR100_ARCHIVE_MD5,
                      timeout: float = 60.0) -> Path:
    """Download, verify (md5) and extract CIFAR-100 into ``<data_dir>/cifar-100-python``.

    ``url`` may be any urllib URL (``file://`` works, for tests and for a
    tarball copied by hand elsewhere); ``md5`` is the expected archive md5.
    If ``<data_dir>/cifar-100-python.tar.gz`` already exists and its md5 is
    right it is used without downloading. Returns the extracted directory.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{data_dir}: cannot create the data directory ({e}). Choose another --data-dir "
                        f"or set SUPERNET_DATA_DIR.") from None
    archive = data_dir / CIFAR100_ARCHIVE
    part = archive.with_name(archive.name + ".part")

    moved = ""
    if archive.exists():
        got = file_md5(archive)
        if got == md5:
            if not quiet:
                print(f"using the verified archive {archive}", file=sys.stderr)
            return _safe_extract(archive, data_dir, quiet)
        bad = archive.with_name(archive.name + ".bad")
        for k in range(1, 1000):            # an earlier .bad is kept too
            if not bad.exists():
                break
            bad = archive.with_name(f"{archive.name}.bad{k}")
        os.replace(archive, bad)            # kept, not deleted: it may be a copy still being made
        moved = (f"{archive} ({_size_note(bad)}) has md5 {got}, not {md5}: it is incomplete or another "
                 f"file; it was moved to {bad}, and the archive is downloaded again.")
        print(moved, file=sys.stderr)       # even when quiet: a file of the user's was moved

    try:
        _fetch(url, part, quiet, timeout)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        kept = (f"\nThe partial download {part} is kept; running the download again resumes it."
                if part.exists() and part.stat().st_size else "")
        raise DataError(f"{moved + chr(10) if moved else ''}Could not download {url} to {part}: {reason}.{kept}\n"
                        f"{_hint_obtain(data_dir, download_failed=True)}") from None

    got = file_md5(part)
    if got != md5:
        part.unlink()
        raise DataError(f"{part}: md5 of the downloaded archive is {got}, expected {md5}; the download is "
                        f"corrupt and was deleted (nothing was extracted). Run the download again, or "
                        f"fetch {CIFAR100_URL} by hand and copy it to {archive}.")
    os.replace(part, archive)
    return _safe_extract(archive, data_dir, quiet)


# --------------------------------------------------------------------------
# Loading and verification
# --------------------------------------------------------------------------


@dataclasses.dataclass(repr=False, eq=False)
class Cifar100:
    """CIFAR-100 (or the synthetic stand-in) in memory.

    Images are uint8 NHWC ``(N, 32, 32, 3)``; labels int64. Treat as read-only:
    TaskSets index into these arrays without copying them.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    train_coarse: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    test_coarse: np.ndarray
    fine_names: list
    coarse_names: list
    synthetic: bool
    root: Path | None = None
    _stats: tuple | None = dataclasses.field(default=None, init=False, compare=False)

    def train_stats(self):
        """Per-channel (mean, std) of the training images, float32 (3,) each (computed once, cached)."""
        if self._stats is None:
            self._stats = channel_stats(self.train_x)
        return self._stats

    def __repr__(self) -> str:
        kind = "synthetic" if self.synthetic else "real"
        return (f"Cifar100({kind}, train={len(self.train_y)}, test={len(self.test_y)}, "
                f"root={str(self.root) if self.root else None})")


def _read_marker(root: Path) -> dict | None:
    path = root / SYNTHETIC_MARKER
    if not path.exists():
        return None
    # The marker holds the set's settings; load_dataset's folder names hold them too.
    made = re.fullmatch(r"synthetic-(\d+)-(\d+)-(\d+)", root.parent.name)
    seed, n_train, n_test = made.groups() if made else ("S", "N", "M")
    fix = (f"delete {root} and regenerate it with `python data.py synthetic --out {root.parent} --seed {seed} "
           f"--train-per-class {n_train} --test-per-class {n_test}`"
           + ("" if made else " (S, N, M: the seed and images per class it was made with)"))
    try:
        marker = json.loads(path.read_text())
        if marker.get("format") != SYNTHETIC_FORMAT:
            raise ValueError(f"format is {marker.get('format')!r}, expected {SYNTHETIC_FORMAT!r}")
        counts = ("n_train", "n_test", "n_train_per_class", "n_test_per_class", "seed")
        for key in ("md5",) + counts:
            if key not in marker:
                raise ValueError(f"missing key {key!r}")
        for key in counts:
            v = marker[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{key} is {v!r}, expected an integer >= 0")
        md5 = marker["md5"]
        if not isinstance(md5, dict) or set(md5) != set(CIFAR100_FILES):
            raise ValueError("md5 must map train, test and meta to their md5s")
        if not all(isinstance(v, str) and re.fullmatch(r"[0-9a-f]{32}", v) for v in md5.values()):
            raise ValueError("md5 values must be 32 hex digits")
        sizes = marker.get("sizes", {})
        if not isinstance(sizes, dict) or not all(
                k in CIFAR100_FILES and isinstance(v, int) and not isinstance(v, bool) for k, v in sizes.items()):
            raise ValueError("sizes must map train, test and meta to byte counts")
    except (ValueError, AttributeError, TypeError, OSError) as e:
        raise DataError(f"{path}: unreadable synthetic-set marker ({e}); {fix}.") from None
    return marker


def _check_split(path: Path, d: dict, n_expected: int, per_class: int, fix: str):
    for key in (b"data", b"fine_labels", b"coarse_labels"):
        if key not in d:
            raise DataError(f"{path}: key {key!r} is missing (keys: {sorted(d)}); the file is not a CIFAR-100 "
                            f"split. Delete it and {fix}.")
    data = d[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: b'data' is {desc}, expected uint8 of shape (N, 3072). Delete it and {fix}.")
    n = data.shape[0]
    if n != n_expected:
        raise DataError(f"{path}: has {n} images, expected {n_expected}. Delete it and {fix}.")
    labels = {}
    for key, hi in ((b"fine_labels", N_FINE), (b"coarse_labels", N_COARSE)):
        try:
            lab = np.asarray(d[key])
        except (ValueError, TypeError):
            lab = np.asarray([], dtype=object)
        if lab.ndim != 1 or len(lab) != n or not np.issubdtype(lab.dtype, np.integer):
            raise DataError(f"{path}: {key!r} must be {n} integer labels, got {lab.dtype} of shape {lab.shape}. "
                            f"Delete it and {fix}.")
        lab = lab.astype(np.int64)
        bad = (lab < 0) | (lab >= hi)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(f"{path}: {key!r} has values outside 0..{hi - 1} (e.g. {int(lab[i])} at index {i}). "
                            f"Delete it and {fix}.")
        labels[key] = lab
    fine, coarse = labels[b"fine_labels"], labels[b"coarse_labels"]
    counts = np.bincount(fine, minlength=N_FINE)
    if counts.min() != per_class or counts.max() != per_class:
        raise DataError(f"{path}: expected {per_class} images per fine class, found {counts.min()}..{counts.max()}. "
                        f"Delete it and {fix}.")
    pairs = np.unique(fine * N_COARSE + coarse)
    if len(pairs) != N_FINE:
        raise DataError(f"{path}: fine labels map to more than one coarse label; the file is corrupt. "
                        f"Delete it and {fix}.")
    # (N, 3072) planar RGB -> (N, 32, 32, 3) NHWC, one vectorised copy.
    x = np.ascontiguousarray(data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1))
    return x, fine, coarse


def _check_meta(path: Path, d: dict, fix: str):
    out = []
    for key, n in ((b"fine_label_names", N_FINE), (b"coarse_label_names", N_COARSE)):
        names = d.get(key)
        if not isinstance(names, (list, tuple)) or len(names) != n:
            raise DataError(f"{path}: {key!r} must be a list of {n} names. Delete it and {fix}.")
        out.append([s.decode("utf-8", "replace") if isinstance(s, bytes) else str(s) for s in names])
    return out


def load_cifar100(data_dir: str | os.PathLike | None = None, download: bool = False, *,
                  verify_md5: bool = True, quiet: bool = False) -> Cifar100:
    """Load and verify ``<data_dir>/cifar-100-python`` (real or synthetic).

    Real set: md5 against the official md5s, 50,000 / 10,000 images. Synthetic
    set (has ``SYNTHETIC.json``): md5s and counts from that marker. Then pickle,
    keys, dtype, shape and label checks. ``download=True`` downloads the real
    set when files are missing. Raises :class:`DataError` on any problem.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    root = data_dir / CIFAR100_DIRNAME
    marker = _read_marker(root)
    if marker is not None:
        fix = (f"regenerate the synthetic set (`python data.py synthetic --out {data_dir} --seed {marker['seed']} "
               f"--train-per-class {marker['n_train_per_class']} --test-per-class {marker['n_test_per_class']}`)")
    else:
        fix = (f"re-download it (load_cifar100(..., download=True) or `python data.py download --data-dir "
               f"{data_dir}`), or place the official file there by hand")

    missing = [root / name for name in CIFAR100_FILES if not (root / name).is_file()]
    if missing and download and marker is None:
        download_cifar100(data_dir, quiet=quiet)
        missing = [root / name for name in CIFAR100_FILES if not (root / name).is_file()]
    if missing:
        names = ", ".join(str(p) for p in missing)
        if marker is not None:
            raise DataError(f"{names}: missing from the synthetic set in {root}; {fix}.")
        raise DataError(f"{names}: CIFAR-100 file not found.\n{_hint_obtain(data_dir)}")

    expected_md5 = marker["md5"] if marker is not None else CIFAR100_MD5
    expected_sizes = marker.get("sizes", {}) if marker is not None else CIFAR100_SIZES
    official = {}
    for name in CIFAR100_FILES:
        path = root / name
        size = path.stat().st_size
        if name in expected_sizes and size != expected_sizes[name]:
            raise DataError(f"{path}: size is {size:,} bytes, expected {expected_sizes[name]:,}; the file is "
                            f"truncated or not the right file. Delete it and {fix}.")
        if verify_md5:
            got = file_md5(path)
            if got != expected_md5[name]:
                what = "the synthetic-set marker" if marker is not None else "the official CIFAR-100 md5"
                raise DataError(f"{path}: md5 is {got}, expected {expected_md5[name]} ({what}); the file is "
                                f"corrupt or incomplete. Delete it and {fix}.")
        official[name] = verify_md5 and marker is None  # md5-verified official file: trusted pickle

    if marker is not None:
        n_train, n_test = int(marker["n_train"]), int(marker["n_test"])
        per_train, per_test = int(marker["n_train_per_class"]), int(marker["n_test_per_class"])
    else:
        n_train, n_test, per_train, per_test = N_TRAIN, N_TEST, N_TRAIN // N_FINE, N_TEST // N_FINE

    meta_path = root / "meta"
    fine_names, coarse_names = _check_meta(meta_path, _load_pickle(meta_path, official["meta"], fix), fix)
    arrays = {}
    for name, n, per in (("train", n_train, per_train), ("test", n_test, per_test)):
        path = root / name
        d = _load_pickle(path, official[name], fix)
        arrays[name] = _check_split(path, d, n, per, fix)
        del d
    (train_x, train_y, train_c), (test_x, test_y, test_c) = arrays["train"], arrays["test"]
    return Cifar100(train_x, train_y, train_c, test_x, test_y, test_c, fine_names, coarse_names,
                    synthetic=marker is not None, root=root)


def load_dataset(source: str, data_dir: str | os.PathLike | None = None, *, seed: int = 0,
                 n_train_per_class: int = 500, n_test_per_class: int = 100,
                 download: bool = True, quiet: bool = False) -> Cifar100:
    """Load the data a run asked for.

    ``'cifar100'``: :func:`load_cifar100` (downloading when missing unless
    ``download=False``). ``'synthetic'``: the synthetic set in
    ``<data_dir>/synthetic-<seed>-<ntrain>-<ntest>/``, generated first if it is
    missing or fails verification, then read through :func:`load_cifar100`.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if source == "cifar100":
        return load_cifar100(data_dir, download=download, quiet=quiet)
    if source != "synthetic":
        raise DataError(f"unknown data source {source!r}; use 'cifar100' or 'synthetic'.")
    sub = data_dir / f"synthetic-{seed}-{n_train_per_class}-{n_test_per_class}"
    marker = sub / CIFAR100_DIRNAME / SYNTHETIC_MARKER
    if marker.exists():
        try:
            ds = load_cifar100(sub)
            m = _read_marker(sub / CIFAR100_DIRNAME)
            if (m["seed"], m["n_train_per_class"], m["n_test_per_class"]) == (seed, n_train_per_class,
                                                                               n_test_per_class):
                return ds
            reason = "it was made with other settings"
        except DataError as e:
            reason = str(e).splitlines()[0]
        if not quiet:
            print(f"regenerating the synthetic set in {sub}: {reason}", file=sys.stderr)
    elif not quiet:
        again = " again (its writing was stopped)" if (sub / CIFAR100_DIRNAME / SYNTHETIC_PENDING).exists() else ""
        print(f"generating a synthetic CIFAR-100 ({n_train_per_class}/{n_test_per_class} per class, "
              f"seed {seed}) in {sub}{again} ...", file=sys.stderr)
    write_synthetic_cifar100(sub, n_train_per_class, n_test_per_class, seed)
    return load_cifar100(sub)


# --------------------------------------------------------------------------
# Synthetic CIFAR-100
# --------------------------------------------------------------------------

# Difficulty knobs (tuned so a linear model on pixels gets roughly 65-85%).
_SYN = dict(
    palette_sd=0.10,     # spread of group colours around grey
    fine_colour_sd=0.06,  # per-class colour shift within a group
    fine_theta=0.25,     # radius (rad) of the fine-class circle in orientation
    fine_logf=0.15,      # radius of the fine-class circle in log-frequency
    jitter_theta=0.15,   # per-image orientation jitter (rad)
    jitter_logf=0.10,    # per-image log-frequency jitter
    position_sd=3.0,     # object position sd (pixels)
    object_colour_sd=0.05,
    contrast_low=0.3,    # contrast ~ U(contrast_low, 1)
    gain_sd=0.15,        # per-channel log-gain sd
    brightness_sd=0.10,
    noise_sd=0.08,       # pixel noise sd (fraction of the 0..255 range)
    noise_grey=0.7,      # fraction (in sd) of the noise shared by the 3 channels
    texture_depth=(0.35, 0.7),  # the dark texture colour B is A * (1 - depth)
    cue_swap=0.25,        # probability that the background / the object comes from a random class
)
_SYN_CHUNK = 1000


def _synthetic_class_params(seed: int) -> dict:
    """Per-fine-class rendering parameters (float32 arrays of length 100)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    G, S = N_COARSE, _SYN

    def colours(n):
        return np.clip(0.5 + S["palette_sd"] * rng.standard_normal((n, 3)), 0.08, 0.92)

    g = dict(A=colours(G), C=colours(G), depth=rng.uniform(*S["texture_depth"], G),
             theta=rng.uniform(0, np.pi, G), logf=np.log(rng.uniform(2.5, 7.0, G)),
             theta2_off=rng.uniform(np.pi / 4, 3 * np.pi / 4, G), logf2=np.log(rng.uniform(2.5, 7.0, G)),
             radius=rng.uniform(6, 10, G), aspect=rng.uniform(1.0, 2.0, G), psi=rng.uniform(0, np.pi, G),
             phase=rng.uniform(0, 2 * np.pi, G))
    c = np.arange(N_FINE)
    gi, j = c // 5, c % 5
    ang = 2 * np.pi * j / 5 + g["phase"][gi]   # 5 classes evenly on a circle around the prototype
    p = dict(
        theta=g["theta"][gi] + S["fine_theta"] * np.cos(ang),
        logf=g["logf"][gi] + S["fine_logf"] * np.sin(ang),
        theta2=g["theta"][gi] + g["theta2_off"][gi] + S["fine_theta"] * np.sin(ang),
        logf2=g["logf2"][gi] + S["fine_logf"] * np.cos(ang),
        radius=g["radius"][gi] * np.exp(0.12 * np.cos(ang + 1.0)),
        aspect=g["aspect"][gi] * np.exp(0.2 * np.sin(ang + 1.0)),
        psi=g["psi"][gi] + 0.4 * np.cos(ang + 2.0),
    )
    for k in "AC":
        p[k] = np.clip(g[k][gi] + S["fine_colour_sd"] * rng.standard_normal((N_FINE, 3)), 0.02, 0.98)
    p["B"] = p["A"] * (1 - g["depth"][gi, None])   # the darker texture colour: same hue, darker
    return {k: v.astype(np.float32) for k, v in p.items()}


def _render_synthetic(p: dict, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Render images of the given fine labels; returns uint8 (n, 3072) planar RGB."""
    n, f32, S = len(labels), np.float32, _SYN
    coord = ((np.arange(32, dtype=f32) - 15.5) / 32)
    yy, xx = coord[:, None], coord[None, :]           # (32,1), (1,32) in [-0.5, 0.5)

    def normal(*shape):
        return rng.standard_normal(shape, dtype=f32)

    def uniform(lo, hi, *shape):
        return (lo + (hi - lo) * rng.random(shape, dtype=f32)).astype(f32)

    def col(v):                                        # (n,) -> (n,1,1)
        return v.astype(f32)[:, None, None]

    # Cue corruption: each image's background (palette + texture) and object (colour + shape) come
    # from its own class, except that each of the two is taken from a random class with probability
    # cue_swap. Images where both cues were swapped carry no class information.
    Lb = np.where(rng.random(n) < S["cue_swap"], rng.integers(0, N_FINE, n), labels)
    Lo = np.where(rng.random(n) < S["cue_swap"], rng.integers(0, N_FINE, n), labels)
    L = Lb
    # Background texture: two oriented gratings with random phase, mixing palette colours A and B.
    mix = np.zeros((n, 32, 32), f32)
    weight2 = uniform(0.2, 0.7, n)
    for key_t, key_f, w in (("theta", "logf", np.ones(n, f32)), ("theta2", "logf2", weight2)):
        th = p[key_t][L] + S["jitter_theta"] * normal(n)
        freq = 2 * np.pi * np.exp(p[key_f][L] + S["jitter_logf"] * normal(n))
        phase = uniform(0, 2 * np.pi, n)
        arg = col(freq * np.cos(th)) * xx + col(freq * np.sin(th)) * yy + col(phase)
        mix += col(w) * np.sin(arg)
    mix = 0.5 + 0.5 * mix / col(1 + weight2)           # in [0, 1]
    A, B = p["A"][L][:, :, None, None], p["B"][L][:, :, None, None]
    img = B + (A - B) * mix[:, None]                   # (n, 3, 32, 32)

    # Object: a soft ellipse of colour C at a random position.
    L = Lo
    cx = np.clip(S["position_sd"] * normal(n), -6, 6) / 32
    cy = np.clip(S["position_sd"] * normal(n), -6, 6) / 32
    psi = p["psi"][L] + 0.3 * normal(n)
    scale = np.exp(0.15 * normal(n))
    ra = p["radius"][L] * np.sqrt(p["aspect"][L]) * scale / 32
    rb = p["radius"][L] / np.sqrt(p["aspect"][L]) * scale / 32
    dx, dy = xx - col(cx), yy - col(cy)
    u = (dx * col(np.cos(psi)) + dy * col(np.sin(psi))) / col(ra)
    v = (dy * col(np.cos(psi)) - dx * col(np.sin(psi))) / col(rb)
    dist = np.sqrt(u * u + v * v)
    alpha = np.clip(0.5 - 4 * (dist - 1), 0, 1) * col(uniform(0.4, 1.0, n))  # soft edge, opacity
    C = (p["C"][L] + S["object_colour_sd"] * normal(n, 3))[:, :, None, None]
    img += alpha[:, None] * (C - img)

    # Clutter: a Gaussian blob of a random colour in 60% of the images.
    bx, by = uniform(-0.5, 0.5, n), uniform(-0.5, 0.5, n)
    br = uniform(0.08, 0.25, n)
    blob = np.exp(-((xx - col(bx)) ** 2 + (yy - col(by)) ** 2) / col(2 * br * br))
    blob *= col((rng.random(n) < 0.6).astype(f32))
    img += blob[:, None] * (rng.random((n, 3), dtype=f32)[:, :, None, None] - img)

    # Lighting and noise: contrast, per-channel gain, brightness, pixel noise.
    contrast = uniform(S["contrast_low"], 1.0, n)[:, None, None, None]
    gain = np.exp(S["gain_sd"] * normal(n, 3))[:, :, None, None]
    bright = (S["brightness_sd"] * normal(n))[:, None, None, None]
    img *= gain                                        # in place from here on: img is the big array
    img -= 0.5
    img *= contrast
    img += 0.5 + bright
    noise = normal(n, 3, 32, 32)                       # colour noise, plus grey (luminance) noise
    noise *= S["noise_sd"] * np.sqrt(1 - S["noise_grey"] ** 2)
    noise += (S["noise_sd"] * S["noise_grey"]) * normal(n, 1, 32, 32)
    img += noise
    img *= 255
    img += 0.5                                         # round to nearest when truncating to uint8
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8).reshape(n, 3072)


def _synthetic_split(p: dict, seed: int, split: int, per_class: int):
    labels = np.repeat(np.arange(N_FINE, dtype=np.int64), per_class)
    np.random.default_rng(np.random.SeedSequence([seed, 1, split])).shuffle(labels)
    data = np.empty((len(labels), 3072), np.uint8)
    for k, s in enumerate(range(0, len(labels), _SYN_CHUNK)):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 2, split, k]))
        data[s:s + _SYN_CHUNK] = _render_synthetic(p, labels[s:s + _SYN_CHUNK], rng)
    return data, labels


def write_synthetic_cifar100(root: str | os.PathLike, n_train_per_class: int = 500,
                             n_test_per_class: int = 100, seed: int = 0) -> Path:
    """Write a synthetic CIFAR-100 to ``root/cifar-100-python`` in the official format.

    Writes ``SYNTHETIC.pending`` first (the directory is a synthetic set from then on: one
    whose writing was stopped, by Ctrl-C or a crash, is written again by the next call,
    not mistaken for a real set), then ``train``, ``test``, ``meta`` (each atomically)
    and ``SYNTHETIC.json`` (their md5s and sizes, counts, seed), and removes the pending
    mark. Deterministic from ``seed``, so two calls writing the same set at once write
    the same bytes. Refuses to overwrite a directory that holds a real (unmarked)
    CIFAR-100. Returns ``root`` (the data_dir to pass to :func:`load_cifar100`).
    See the module docstring for what the images look like.
    """
    for name, v in (("n_train_per_class", n_train_per_class), ("n_test_per_class", n_test_per_class),
                    ("seed", seed)):
        if not isinstance(v, (int, np.integer)) or v < (0 if name == "seed" else 1):
            kind = "non-negative" if name == "seed" else "positive"
            raise DataError(f"write_synthetic_cifar100: {name} must be a {kind} integer, got {v!r}.")
    root = Path(root)
    out = root / CIFAR100_DIRNAME
    marker, pending = out / SYNTHETIC_MARKER, out / SYNTHETIC_PENDING
    if (out.is_dir() and not marker.exists() and not pending.exists()
            and any((out / f).exists() for f in CIFAR100_FILES)):
        raise DataError(f"{out}: holds CIFAR-100 files without a {SYNTHETIC_MARKER} or {SYNTHETIC_PENDING} "
                        f"marker (a real set?); refusing to overwrite them. Choose another output directory "
                        f"(or, if it is a synthetic set this code's older versions left unfinished, delete it).")
    try:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(pending, b"a synthetic CIFAR-100 is being written here (data.py)\n")
    except OSError as e:
        raise DataError(f"{out}: cannot write there ({e}). Choose another output directory.") from None
    if marker.exists():
        marker.unlink()  # the set is invalid until the new marker is written

    fine_names = [f"fine_{i:02d}" for i in range(N_FINE)]
    coarse_names = [f"coarse_{i:02d}" for i in range(N_COARSE)]
    p = _synthetic_class_params(int(seed))
    sizes, md5s = {}, {}
    for split, (name, per, batch_label) in enumerate((("train", n_train_per_class, b"training batch 1 of 1"),
                                                      ("test", n_test_per_class, b"testing batch 1 of 1"))):
        data, labels = _synthetic_split(p, int(seed), split, int(per))
        d = {
            b"filenames": [f"{fine_names[c]}_s_{i:06d}.png".encode() for i, c in enumerate(labels)],
            b"batch_label": batch_label,
            b"fine_labels": labels.tolist(),
            b"coarse_labels": (labels // 5).tolist(),
            b"data": data,
        }
        _atomic_write_pickle(out / name, d)
        del d, data
    _atomic_write_pickle(out / "meta", {b"fine_label_names": [s.encode() for s in fine_names],
                                        b"coarse_label_names": [s.encode() for s in coarse_names]})
    for name in CIFAR100_FILES:
        sizes[name] = (out / name).stat().st_size
        md5s[name] = file_md5(out / name)
    info = {
        "format": SYNTHETIC_FORMAT,
        "version": SYNTHETIC_VERSION,
        "generator": "supernet data.py write_synthetic_cifar100",
        "seed": int(seed),
        "n_train_per_class": int(n_train_per_class),
        "n_test_per_class": int(n_test_per_class),
        "n_train": int(n_train_per_class) * N_FINE,
        "n_test": int(n_test_per_class) * N_FINE,
        "fine_to_coarse": "coarse = fine // 5",
        "md5": md5s,
        "sizes": sizes,
    }
    _atomic_write_bytes(marker, (json.dumps(info, indent=2) + "\n").encode())
    pending.unlink(missing_ok=True)   # (a second writer of the same set may have removed it already)
    return root


# --------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------

Task = namedtuple("Task", "class0 class1")
Task.__doc__ = "A binary task: images of fine class `class0` get label 0, those of `class1` label 1."


def exp1_tasks() -> list:
    """Experiment 1: T_i = (i, 99) for i = 0..98 (label 1 is always class 99)."""
    return [Task(i, 99) for i in range(99)]


def exp2_tasks() -> list:
    """Experiment 2: task i = (i, i+50) and task 50+i = (i+50, i), i < 50 (same pairs, labels swapped)."""
    return [Task(i, i + 50) for i in range(50)] + [Task(i + 50, i) for i in range(50)]


def pair_tasks(pairs: Iterable, n_classes: int = N_FINE) -> list:
    """Validate a list of (class0, class1) pairs and return them as Tasks."""
    tasks = []
    for k, pair in enumerate(pairs):
        try:
            a, b = pair
        except (TypeError, ValueError):
            raise TaskSpecError(f"task {k}: {pair!r} is not a (class0, class1) pair.") from None
        for c in (a, b):
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
                raise TaskSpecError(f"task {k}: class {c!r} is not an integer.")
            if not 0 <= c < n_classes:
                raise TaskSpecError(f"task {k}: class {c} is outside 0..{n_classes - 1}.")
        if a == b:
            raise TaskSpecError(f"task {k}: class0 and class1 are both {a}; a task needs two different classes.")
        tasks.append(Task(int(a), int(b)))
    if not tasks:
        raise TaskSpecError("the task list is empty.")
    return tasks


def parse_task_range(spec: str, n_tasks: int | None = None) -> list:
    """Parse "90-98" or "1,5,7-9" into a sorted list of distinct ints (checked against n_tasks if given)."""
    if not isinstance(spec, str) or not spec.strip():
        raise TaskSpecError(f"empty task range {spec!r}; use e.g. '90-98' or '1,5,7-9'.")
    out = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            lo_s, _, hi_s = part.partition("-")
            lo = int(lo_s)
            hi = int(hi_s) if hi_s else lo
            if part.endswith("-"):
                raise ValueError
        except ValueError:
            raise TaskSpecError(f"bad task range element {part!r} in {spec!r}; use e.g. '90-98' or '1,5,7-9' "
                                f"(non-negative ints).") from None
        if hi < lo:
            raise TaskSpecError(f"range {part!r} is backwards; write it as '{hi}-{lo}'.")
        if n_tasks is not None and hi >= n_tasks:
            raise TaskSpecError(f"task {hi} in {spec!r} is out of range: there are {n_tasks} tasks (0..{n_tasks - 1}).")
        out.update(range(lo, hi + 1))
    return sorted(out)


# --------------------------------------------------------------------------
# TaskSet: batches from index arrays
# --------------------------------------------------------------------------


def channel_stats(x: np.ndarray, chunk: int = 2048):
    """Exact per-channel mean and (population) std of uint8 NHWC images, as float32 (3,) arrays.

    Uses a per-channel 256-bin histogram accumulated over chunks (float64
    maths, no float copy of the images).
    """
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"channel_stats expects uint8 (N, H, W, 3), got {x.dtype} {x.shape}")
    hist = np.zeros(3 * 256, np.int64)
    offset = np.array([0, 256, 512], np.int32)
    for s in range(0, len(x), chunk):
        v = x[s:s + chunk].reshape(-1, 3).astype(np.int32) + offset
        hist += np.bincount(v.ravel(), minlength=3 * 256)
    hist = hist.reshape(3, 256).astype(np.float64)
    values = np.arange(256, dtype=np.float64)
    n = hist.sum(axis=1)
    mean = (hist * values).sum(axis=1) / n
    var = (hist * (values - mean[:, None]) ** 2).sum(axis=1) / n
    return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


class _SplitIndex:
    """Concatenated per-task index arrays into one split (train or test)."""

    def __init__(self, labels: np.ndarray, tasks: Sequence[Task], split: str):
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=N_FINE)
        starts = np.concatenate([[0], np.cumsum(counts)])
        idx, lab, self.count = [], [], np.zeros(len(tasks), np.int64)
        for t, task in enumerate(tasks):
            parts = []
            for y, c in enumerate(task):
                members = order[starts[c]:starts[c + 1]]
                if len(members) == 0:
                    raise DataError(f"task {t} {tuple(task)}: fine class {c} has no {split} images in this dataset.")
                parts.append(members)
                lab.append(np.full(len(members), y, np.float32))
            idx.extend(parts)
            self.count[t] = sum(len(m) for m in parts)
        self.index = np.concatenate(idx).astype(np.int64)
        self.label = np.concatenate(lab)
        self.offset = np.concatenate([[0], np.cumsum(self.count)[:-1]]).astype(np.int64)

    def task(self, t: int):
        s = self.offset[t]
        return self.index[s:s + self.count[t]], self.label[s:s + self.count[t]]


class TaskSet:
    """Binary tasks over a :class:`Cifar100`, served as normalised float32 NHWC batches.

    Images stay in the dataset's uint8 arrays; a TaskSet only holds index
    arrays. ``mean``/``std`` (float32, per channel) come from the dataset's
    whole training split.
    """

    def __init__(self, dataset: Cifar100, tasks: Iterable, augment: bool = False):
        self.dataset = dataset
        self.tasks = pair_tasks(tasks)
        self.augment = bool(augment)
        self.mean, self.std = dataset.train_stats()
        self._train = _SplitIndex(dataset.train_y, self.tasks, "train")
        self._test = _SplitIndex(dataset.test_y, self.tasks, "test")

    def __len__(self) -> int:
        return len(self.tasks)

    def __repr__(self) -> str:
        return f"TaskSet({len(self)} tasks, {self.dataset!r}, augment={self.augment})"

    def _check_task(self, t) -> int:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < len(self.tasks):
            raise TaskSpecError(f"task id {t!r} is out of range: this TaskSet has {len(self.tasks)} tasks.")
        return int(t)

    def _split(self, split: str) -> _SplitIndex:
        if split == "train":
            return self._train
        if split == "test":
            return self._test
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")

    def n_train(self, t: int) -> int:
        return int(self._train.count[self._check_task(t)])

    def n_test(self, t: int) -> int:
        return int(self._test.count[self._check_task(t)])

    def indices(self, t: int, split: str = "train"):
        """(image indices into the split's arrays, float32 labels) of task t; class0 first."""
        return self._split(split).task(self._check_task(t))

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """uint8 NHWC -> float32 ``(x - mean) / std`` (train statistics)."""
        out = x.astype(np.float32)
        out -= self.mean
        out /= self.std
        return out

    def sample_indices(self, rng, task_ids, per_task: int):
        """Draw train indices with replacement: (idx int64, y float32, task int64), each (T*per_task,).

        Grouped by task in the order of ``task_ids``. Uses exactly the random
        draws that :meth:`sample_batch` makes first.
        """
        rng = np.random.default_rng(rng)
        ids = np.atleast_1d(np.asarray(task_ids))
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or len(ids) == 0:
            raise TaskSpecError(f"task_ids must be a non-empty 1-D list of ints, got {task_ids!r}.")
        ids = ids.astype(np.int64)
        if ids.min() < 0 or ids.max() >= len(self.tasks):
            raise TaskSpecError(f"task_ids {task_ids!r} out of range: this TaskSet has {len(self.tasks)} tasks.")
        if int(per_task) < 1:
            raise ValueError(f"per_task must be >= 1, got {per_task}")
        per_task = int(per_task)
        draw = rng.integers(0, self._train.count[ids][:, None], size=(len(ids), per_task))
        pos = (self._train.offset[ids][:, None] + draw).ravel()
        return self._train.index[pos], self._train.label[pos], np.repeat(ids, per_task)

    def sample_batch(self, rng, task_ids, per_task: int, augment: bool | None = None):
        """A training batch: x float32 (T*per_task, 32, 32, 3), y float32, task int64.

        Samples are grouped by task in the order of ``task_ids`` and drawn with
        replacement from each task's train images using ``rng`` (a NumPy
        Generator or seed). ``augment`` defaults to the TaskSet's setting.
        """
        rng = np.random.default_rng(rng)
        idx, y, task = self.sample_indices(rng, task_ids, per_task)
        x = self.dataset.train_x[idx]
        if self.augment if augment is None else augment:
            x = augment_batch(x, rng)
        return self.normalize(x), y, task

    def arrays(self, t: int, split: str = "test"):
        idx, y = self.indices(t, split)
        src = self.dataset.train_x if split == "train" else self.dataset.test_x
        return self.normalize(src[idx]), y.copy()

    def train_arrays(self, t: int):
        """(x float32 normalised, y float32) of all train images of task t."""
        return self.arrays(t, "train")

    def test_arrays(self, t: int):
        """(x float32 normalised, y float32) of all test images of task t."""
        return self.arrays(t, "test")

    def eval_batches(self, t: int, split: str = "test", batch_size: int = 500) -> Iterator:
        """Yield (x, y) chunks of at most batch_size covering task t's split once, in order."""
        idx, y = self.indices(t, split)
        src = self.dataset.train_x if split == "train" else self.dataset.test_x
        for s in range(0, len(idx), batch_size):
            yield self.normalize(src[idx[s:s + batch_size]]), y[s:s + batch_size].copy()


def augment_batch(x: np.ndarray, rng, pad: int = 4) -> np.ndarray:
    """Random crop (``pad`` pixels of zero padding) and random horizontal flip of uint8 NHWC images.

    One vectorised gather; the offsets and flips come from ``rng``.
    """
    rng = np.random.default_rng(rng)
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oy = rng.integers(0, 2 * pad + 1, n)
    ox = rng.integers(0, 2 * pad + 1, n)
    flip = rng.random(n) < 0.5
    rows = oy[:, None] + np.arange(h)
    cols = np.where(flip[:, None], ox[:, None] + np.arange(w)[::-1], ox[:, None] + np.arange(w))
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


# --------------------------------------------------------------------------
# Montage
# --------------------------------------------------------------------------

MONTAGE_PAD = 4
MONTAGE_LABEL_H = 16


def montage_size(n_per_class: int, scale: int = 3):
    """(width, height) in pixels of a :func:`save_task_montage` image."""
    cell = 32 * scale
    return (MONTAGE_PAD + n_per_class * (cell + MONTAGE_PAD),
            MONTAGE_PAD + 2 * (MONTAGE_LABEL_H + cell + MONTAGE_PAD))


def save_task_montage(path: str | os.PathLike, dataset: Cifar100, task, n_per_class: int = 8,
                      split: str = "train", scale: int = 3) -> Path:
    """Write one PNG: a row of class0 examples ("label 0: <name>") above a row of class1 examples.

    Uses the first ``n_per_class`` images of each class in ``split``, scaled up
    ``scale`` times (nearest neighbour). Returns the path.
    """
    from PIL import Image, ImageDraw

    task = pair_tasks([task])[0]
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    xs, ys = (dataset.train_x, dataset.train_y) if split == "train" else (dataset.test_x, dataset.test_y)
    width, height = montage_size(n_per_class, scale)
    cell = 32 * scale
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for row, c in enumerate(task):
        top = MONTAGE_PAD + row * (MONTAGE_LABEL_H + cell + MONTAGE_PAD)
        draw.text((MONTAGE_PAD, top + 2), f"label {row}: {dataset.fine_names[c]} (class {c})", fill=(0, 0, 0))
        for k, i in enumerate(np.flatnonzero(ys == c)[:n_per_class]):
            tile = Image.fromarray(xs[i]).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (MONTAGE_PAD + k * (cell + MONTAGE_PAD), top + MONTAGE_LABEL_H))
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _cmd_synthetic(a) -> None:
    t0 = time.perf_counter()
    root = write_synthetic_cifar100(a.out, a.train_per_class, a.test_per_class, a.seed)
    print(f"wrote a synthetic CIFAR-100 ({a.train_per_class}/{a.test_per_class} images per class, seed {a.seed}) "
          f"to {root / CIFAR100_DIRNAME} in {time.perf_counter() - t0:.1f} s")


def _cmd_download(a) -> None:
    out = download_cifar100(a.data_dir, a.url, quiet=a.quiet)
    t0 = time.perf_counter()
    ds = load_cifar100(a.data_dir)
    print(f"CIFAR-100 ready in {out}: {len(ds.train_y)} train / {len(ds.test_y)} test images, verified in "
          f"{time.perf_counter() - t0:.1f} s")


def _cmd_check(a) -> None:
    t0 = time.perf_counter()
    ds = load_cifar100(a.data_dir, verify_md5=not a.no_md5)
    t_load = time.perf_counter() - t0
    mean, std = channel_stats(ds.train_x)
    kind = "synthetic" if ds.synthetic else "real CIFAR-100"
    for name, y in (("train", ds.train_y), ("test", ds.test_y)):
        c = np.bincount(y, minlength=N_FINE)
        print(f"{name}: {len(y)} images, {c.min()}..{c.max()} per fine class")
    print(f"{kind} in {ds.root}: OK ({'md5 verified, ' if not a.no_md5 else ''}loaded in {t_load:.2f} s)")
    print(f"train mean {np.round(mean, 2).tolist()} std {np.round(std, 2).tolist()} (0..255 scale)")


def _task_list(task_set: str) -> list:
    """The tasks of --task-set: exp1_tasks() or exp2_tasks()."""
    return exp1_tasks() if task_set == "exp1" else exp2_tasks()


def _check_montage(a, error) -> None:
    """The montage options, checked before any data is loaded or generated (error: ap.error)."""
    from PIL import Image

    n_tasks = len(_task_list(a.task_set))
    if not 0 <= a.task < n_tasks:
        error(f"--task {a.task} is out of range for {a.task_set} (0..{n_tasks - 1})")
    if a.data == "synthetic":
        per_class = a.train_per_class if a.split == "train" else a.test_per_class
    else:
        per_class = (N_TRAIN if a.split == "train" else N_TEST) // N_FINE
    if a.n_per_class is None:
        a.n_per_class = min(8, per_class)
    elif a.n_per_class > per_class:
        error(f"--n-per-class {a.n_per_class}: the {a.split} split has {per_class} images per class")
    Image.init()
    if Image.registered_extensions().get(a.out.suffix.lower()) not in Image.SAVE:
        error(f"--out {a.out}: the name must end in an image extension Pillow can write (e.g. .png)")
    if a.out.is_dir():
        error(f"--out {a.out}: is a directory")
    folder = next(p for p in a.out.absolute().parents if p.exists())
    if not folder.is_dir():
        error(f"--out {a.out}: {folder} is not a folder")


def _cmd_montage(a) -> None:
    ds = load_dataset(a.data, a.data_dir, seed=a.seed, n_train_per_class=a.train_per_class,
                      n_test_per_class=a.test_per_class)
    task = _task_list(a.task_set)[a.task]
    try:
        path = save_task_montage(a.out, ds, task, a.n_per_class, a.split)
    except OSError as e:
        raise DataError(f"{a.out}: cannot write the montage ({e}).") from None
    print(f"{a.task_set} task {a.task} = {tuple(task)}: wrote {path}")


def int_at_least(low: int):
    """argparse type: an int >= low (data.py's and bench.py's command lines)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {n}")
        return n
    return parse


def _add_data_dir(p) -> None:
    p.add_argument("--data-dir", type=Path, default=None, help="data dir (default: $SUPERNET_DATA_DIR or "
                                                                "~/.cache/supernet)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python data.py",
        description="CIFAR-100 data for SuperNet: synthetic stand-in, download, check, task montages.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Default data dir: $SUPERNET_DATA_DIR or ~/.cache/supernet (now {default_data_dir()}).")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("synthetic", help="write a synthetic CIFAR-100 in the official format",
                       description="Write DIR/cifar-100-python/{train,test,meta,SYNTHETIC.json}, "
                                   "deterministic from --seed.")
    p.add_argument("--out", required=True, type=Path, help="data dir to write into (DIR/cifar-100-python/)")
    p.add_argument("--train-per-class", type=int_at_least(1), default=500,
                   help="train images per fine class (default 500)")
    p.add_argument("--test-per-class", type=int_at_least(1), default=100,
                   help="test images per fine class (default 100)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="generator seed (default 0)")
    p.set_defaults(func=_cmd_synthetic)

    p = sub.add_parser("download", help="download, verify and extract the real CIFAR-100",
                       description="Download cifar-100-python.tar.gz (resumable), check its md5, extract it "
                                   "into DIR/cifar-100-python and verify the files.")
    _add_data_dir(p)
    p.add_argument("--url", default=CIFAR100_URL, help="archive URL (default: the official one)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("check", help="load and verify a data dir, print counts and timing",
                       description="Load DIR/cifar-100-python (real or synthetic) through the normal loader, "
                                   "verifying md5s, shapes and labels.")
    _add_data_dir(p)
    p.add_argument("--no-md5", action="store_true", help="skip the md5 check (faster, less safe)")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("montage", help="save a PNG of a task's two classes",
                       description="Save a PNG with a row of label-0 images and a row of label-1 images.")
    p.add_argument("--data", choices=("synthetic", "cifar100"), default="synthetic",
                   help="real CIFAR-100 (downloaded if missing) or the synthetic set (generated if missing)")
    _add_data_dir(p)
    p.add_argument("--task-set", choices=("exp1", "exp2"), default="exp1", help="which task list (default exp1)")
    p.add_argument("--task", type=int, default=0, help="task index in the list (default 0)")
    p.add_argument("--out", type=Path, default=Path("task.png"), help="output PNG (default task.png)")
    p.add_argument("--split", choices=("train", "test"), default="train", help="images from which split")
    p.add_argument("--n-per-class", type=int_at_least(1), default=None,
                   help="images per row (default 8, or the split's images per class if fewer)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="synthetic set seed (default 0)")
    p.add_argument("--train-per-class", type=int_at_least(1), default=500, help="synthetic train images per class")
    p.add_argument("--test-per-class", type=int_at_least(1), default=100, help="synthetic test images per class")
    p.set_defaults(func=_cmd_montage, check=_check_montage, parser=p)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "check"):                 # before any data is loaded or generated
        args.check(args, args.parser.error)
    try:
        args.func(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
