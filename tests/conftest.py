"""Shared test fixtures: the project root on sys.path, a tiny corpus, tiny configs, MNIST-1D
and tiny MNIST data folders."""
import gzip
import hashlib
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# a small text the tests own: ~12 kB, 30-odd distinct characters
TINY_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
             "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 60

TINY_OVERRIDES = dict(n_layer=1, n_embd=16, n_head=2, block_size=16, batch_size=4, max_iters=6,
                      eval_interval=3, eval_iters=2, n_eval=24, dropout=0.1)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    """The tiny corpus once per test module, for module-scoped studies."""
    path = tmp_path_factory.mktemp('corpus') / 'tiny.txt'
    path.write_text(TINY_TEXT, encoding='utf-8')
    return str(path)


@pytest.fixture
def tiny_corpus(tmp_path):
    path = tmp_path / 'tiny.txt'
    path.write_text(TINY_TEXT, encoding='utf-8')
    return str(path)


@pytest.fixture
def tiny_config(tiny_corpus):
    from config import get_config
    return get_config('cpu', dataset=tiny_corpus, **TINY_OVERRIDES)


@pytest.fixture(scope='session')
def mnist1d_dir(tmp_path_factory):
    """A data folder whose MNIST-1D cache is made once for the whole session (~1.5 s)."""
    import mnist
    d = str(tmp_path_factory.mktemp('data'))
    mnist.load_mnist1d(d)
    return d


def idx_bytes(array, code=0x08):
    """The bytes of an IDX file holding `array` (type code 0x08: unsigned bytes)."""
    import mnist
    a = np.asarray(array)
    header = bytes([0, 0, code, a.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in a.shape)
    return header + a.astype(np.dtype(mnist.IDX_DTYPES[code])).tobytes()


@pytest.fixture
def tiny_mnist(tmp_path, monkeypatch):
    """Four tiny MNIST-format files with their md5s patched in: the real loading path, offline."""
    import mnist
    rng = np.random.default_rng(0)
    folder = tmp_path / 'mnist'
    folder.mkdir()
    files = {}
    for key, n in (('train', 60), ('test', 20)):
        y = rng.integers(10, size=n).astype(np.uint8)
        x = (rng.random((n, 28, 28)) * 40 + y[:, None, None] * 20).astype(np.uint8)  # learnable
        for kind, arr in (('images', x), ('labels', y)):
            fname, _, _ = mnist.MNIST_FILES[f'{key}_{kind}']
            data = gzip.compress(idx_bytes(arr))
            (folder / fname).write_bytes(data)
            files[f'{key}_{kind}'] = (fname, hashlib.md5(data).hexdigest(), arr.shape)
    monkeypatch.setattr(mnist, 'MNIST_FILES', files)
    monkeypatch.setitem(mnist.VAL_SIZE, 'mnist', 20)
    mnist._splits.cache_clear()
    yield str(tmp_path)
    mnist._splits.cache_clear()


def trial_path(results_dir, study, model, activation, trial, ext='json'):
    """A trial's file, as the store names it (store.TrialKey)."""
    import store
    return store.TrialKey(str(results_dir), study, model, activation, trial).path(ext)
