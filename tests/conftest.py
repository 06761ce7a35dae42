"""Shared test fixtures: the project root on sys.path, a tiny corpus, tiny configs."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# a small text the tests own: ~12 kB, 30-odd distinct characters
TINY_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
             "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 60

TINY_OVERRIDES = dict(n_layer=1, n_embd=16, n_head=2, block_size=16, batch_size=4, max_iters=6,
                      eval_interval=3, eval_iters=2, n_eval=24, dropout=0.1)


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
