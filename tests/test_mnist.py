"""MNIST / MNIST-1D: IDX parsing and checksums on files the tests write (never the real
MNIST), the classification task, the ffn model, best-of-k bootstrap on hand-made pools, and
a tiny MNIST-1D study end to end."""
import gzip
import hashlib
import json
import os
import random

import numpy as np
import pytest
import torch

import fileio
import mnist
import train
from config import get_config
from model_factories import CLASSIFIER_NAMES, MODEL_NAMES, build_model, check_model, count_parameters
from fileio import DataError, write_json
from prepare_data import make_task


def idx_bytes(array, code=0x08):
    a = np.asarray(array)
    header = bytes([0, 0, code, a.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in a.shape)
    return header + a.astype(np.dtype(mnist.IDX_DTYPES[code])).tobytes()


@pytest.fixture(scope='session')
def mnist1d_dir(tmp_path_factory):
    """A data folder whose MNIST-1D cache is made once for the whole session."""
    d = str(tmp_path_factory.mktemp('data'))
    mnist.load_mnist1d(d)
    return d


# ----------------------------------------------------------------------------- IDX files

def test_idx_round_trip_raw_and_gzip(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    for name, data in (('a.idx', idx_bytes(images)), ('a.idx.gz', gzip.compress(idx_bytes(images)))):
        (tmp_path / name).write_bytes(data)
        out = mnist.read_idx(str(tmp_path / name))
        assert out.dtype == np.uint8 and out.shape == (3, 4, 5)
        np.testing.assert_array_equal(out, images)
    ints = np.array([1, -2, 70000], dtype=np.int32)
    np.testing.assert_array_equal(mnist.parse_idx(idx_bytes(ints, 0x0C)), ints)  # big-endian int32


def test_idx_wrong_magic_number(tmp_path):
    data = bytearray(idx_bytes(np.zeros((2, 3), np.uint8)))
    data[0] = 0x12
    path = tmp_path / 'bad.idx'
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r'bad\.idx: not an IDX file: magic number 0x12000802'):
        mnist.read_idx(str(path))
    data[0], data[2] = 0, 0x07  # unknown type code
    with pytest.raises(DataError, match='not an IDX file'):
        mnist.parse_idx(bytes(data))


def test_idx_truncated_file(tmp_path):
    data = idx_bytes(np.zeros((10, 28, 28), np.uint8))
    path = tmp_path / 'short.idx'
    path.write_bytes(data[:-100])
    with pytest.raises(DataError, match=r"short\.idx: truncated: its header declares shape \(10, 28, 28\) "
                                        r"\(7,840 bytes of uint8\) but only 7,740 bytes follow"):
        mnist.read_idx(str(path))
    with pytest.raises(DataError, match='truncated: the header'):
        mnist.parse_idx(data[:10])
    with pytest.raises(DataError, match='truncated'):
        mnist.parse_idx(b'\x00\x00')
    with pytest.raises(DataError, match='unexpected bytes after'):
        mnist.parse_idx(data + b'\x00')
    gz = gzip.compress(data)
    with pytest.raises(DataError, match='corrupt or truncated gzip'):
        mnist.parse_idx(gz[:len(gz) // 2])


# ----------------------------------------------------------------------------- MNIST files

def test_md5_mismatch_is_an_error(tmp_path):
    folder = tmp_path / 'mnist'
    folder.mkdir()
    bad = folder / 'train-images-idx3-ubyte.gz'
    bad.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 28, 28), np.uint8))))
    with pytest.raises(DataError, match='md5 .* does not match MNIST train-images-idx3-ubyte.gz'):
        mnist.mnist_path('train_images', str(tmp_path))
    assert bad.exists(), "a corrupt file is reported, not silently replaced"


def test_offline_without_mnist_says_where_to_put_it(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise OSError('network unreachable')
    monkeypatch.setattr(fileio.urllib.request, 'urlopen', no_network)
    with pytest.raises(DataError) as e:
        mnist.mnist_path('test_labels', str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / 'mnist') in msg and 't10k-labels-idx1-ubyte.gz' in msg and 'network unreachable' in msg
    assert not list(tmp_path.rglob('*.tmp'))


@pytest.fixture
def tiny_mnist(tmp_path, monkeypatch):
    """Four tiny MNIST-format files with their md5s patched in: the real loading path, offline."""
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


def test_mnist_trial_with_tiny_files(tiny_mnist, tmp_path):
    cfg = get_config('mnist_ffn', dataset='mnist', batch_size=8, eval_interval=2, eval_iters=2)
    task = make_task(cfg, tiny_mnist)
    assert (len(task.train_y), len(task.eval_y), len(task.test_y)) == (40, 20, 20)
    assert task.config_updates() == {'vocab_size': 10, 'n_inputs': 784, 'n_eval': 20, 'max_iters': 5}
    assert abs(float(task.eval_x.mean())) < 5  # standardised pixels, not raw bytes
    r = train.run_trial('ffn', 'relu', 0, cfg, 's', train.RunOptions(str(tmp_path / 'res'), data_dir=tiny_mnist,
                                                                      progress=False))
    m = r['metrics']
    assert m['iters'] == 5 and 0 <= m['test_accuracy'] <= 1 and m['n_test'] == 20
    assert r['data']['md5']['train-images-idx3-ubyte.gz'] == mnist.MNIST_FILES['train_images'][1]
    with np.load(train.trial_path(str(tmp_path / 'res'), 's', 'ffn', 'relu', 0, 'npz')) as z:
        assert z['probs'].shape == (20, 10)
        np.testing.assert_array_equal(z['targets'], task.eval_y.numpy())


# ----------------------------------------------------------------------------- MNIST-1D task

def test_mnist1d_task_splits_and_epochs(mnist1d_dir):
    cfg = get_config('mnist_ffn', batch_size=64)
    task = make_task(cfg, mnist1d_dir)
    assert task.kind == 'classification'
    assert (len(task.train_y), len(task.eval_y), len(task.test_y)) == (3000, 1000, 1000)
    assert task.eval_x.shape == (1000, 40) and task.eval_x.dtype == torch.float32
    assert task.config_updates() == {'vocab_size': 10, 'n_inputs': 40, 'n_eval': 1000, 'max_iters': 47}
    # validation = eval set, carved from the training set: disjoint from what is trained on
    assert len(set(task.eval_indices.tolist())) == 1000 and task.eval_indices.max() < 4000
    # an epoch visits every training example exactly once, in an order set by the generator
    stream = task.train_batches(64, torch.Generator().manual_seed(0))
    seen = [next(stream) for _ in range(47)]
    assert [len(y) for _, y in seen][-1] == 3000 - 46 * 64
    xs = torch.cat([x for x, _ in seen])
    assert torch.equal(torch.sort(xs[:, 0])[0], torch.sort(task.train_x[:, 0])[0])
    again = next(task.train_batches(64, torch.Generator().manual_seed(0)))
    assert torch.equal(again[0], seen[0][0])
    # another eval_seed carves another validation split (another eval hash)
    other = make_task(get_config('mnist_ffn', eval_seed=7), mnist1d_dir)
    assert other.eval_hash != task.eval_hash and make_task(cfg, mnist1d_dir).eval_hash == task.eval_hash


def test_mnist1d_generation_is_cached_and_leaves_global_rngs_alone(mnist1d_dir, monkeypatch, tmp_path):
    np.random.seed(5)
    random.seed(5)
    a = mnist.load_mnist1d(str(tmp_path))  # generated: make_dataset reseeds both RNGs inside
    assert np.random.random() == np.random.RandomState(5).random_sample()
    assert random.random() == random.Random(5).random()

    def no_generation():
        raise AssertionError('the cache should have been used')
    monkeypatch.setattr(mnist, 'generate_mnist1d', no_generation)
    b = mnist.load_mnist1d(str(tmp_path))
    assert a['digest'] == b['digest'] == mnist.load_mnist1d(mnist1d_dir)['digest']
    np.testing.assert_array_equal(a['train_x'], b['train_x'])


# ----------------------------------------------------------------------------- the model

def test_ffn_model_widths_and_registry():
    assert CLASSIFIER_NAMES == ['ffn'] and 'ffn' not in MODEL_NAMES
    with pytest.raises(ValueError) as e:
        check_model('mlp')
    assert all(m in str(e.value) for m in MODEL_NAMES + ['ffn'])
    cfg = get_config('mnist_ffn', hidden=2)  # hidden 2 is a valid config
    relu, geglu = build_model('ffn', 'relu', cfg, seed=0), build_model('ffn', 'geglu', cfg, seed=0)
    assert relu.body[0].weight.shape == (2, 40) and relu.head.weight.shape == (10, 2)
    # gated: round(2/3 * 2) = 1 unit, whose gate and value come from one Linear(40, 2)
    assert geglu.body[0].weight.shape == (2, 40) and geglu.head.weight.shape == (10, 1)
    assert (count_parameters(relu), count_parameters(geglu)) == (40 * 2 + 2 + 2 * 10 + 10, 40 * 2 + 2 + 10 + 10)
    deep = build_model('ffn', 'swiglu', get_config('mnist_ffn', hidden=16, depth=3, dataset='mnist'), seed=0)
    assert [l.weight.shape for l in deep.modules() if isinstance(l, torch.nn.Linear)] == \
        [(22, 784), (22, 11), (22, 11), (10, 11)]
    x = torch.randn(5, 28, 28)
    logits, loss = deep(x, torch.arange(5))
    assert logits.shape == (5, 10) and torch.isfinite(loss) and deep(x)[1] is None
    # same seed -> same weights; another seed -> others
    assert torch.equal(build_model('ffn', 'relu', cfg, seed=0).head.weight, relu.head.weight)
    assert not torch.equal(build_model('ffn', 'relu', cfg, seed=1).head.weight, relu.head.weight)


def test_model_and_task_kinds_must_match(mnist1d_dir, tiny_corpus, tmp_path):
    with pytest.raises(ValueError, match="model 'minigpt' trains on lm data, but dataset 'mnist1d'"):
        train.run_trial('minigpt', 'gelu', 0, get_config('mnist_ffn'), None,
                        train.RunOptions(str(tmp_path), data_dir=mnist1d_dir, progress=False))
    with pytest.raises(ValueError, match="model 'ffn' trains on classification data"):
        train.run_trial('ffn', 'relu', 0, get_config('cpu', dataset=tiny_corpus), None,
                        train.RunOptions(str(tmp_path), progress=False))
    assert not list(tmp_path.rglob('*.json'))


# ----------------------------------------------------------------------------- best-of-k

def test_best_of_k_on_a_hand_made_pool():
    val = np.array([0.1, 0.5, 0.3, 0.9])
    test = np.array([0.2, 0.4, 0.6, 0.8])
    full = mnist.best_of_k(val, test, 4, n_resamples=50)
    assert [full[k] for k in ('val_mean', 'val_std', 'test_mean', 'test_std')] == pytest.approx([0.9, 0, 0.8, 0])
    assert set(full['picked']) == {3}
    # k=2 of [0.1, 0.5, 0.3, 0.9]: max is 0.9 w.p. 3/6, 0.5 w.p. 2/6, 0.3 w.p. 1/6
    exact = (0.9 * 3 + 0.5 * 2 + 0.3 * 1) / 6
    assert mnist.expected_best_of_k(val, 2) == pytest.approx(exact)
    assert mnist.expected_best_of_k(val, 1) == pytest.approx(val.mean())
    many = mnist.best_of_k(val, test, 2, n_resamples=20000, seed=1)
    assert many['val_mean'] == pytest.approx(exact, abs=0.005)
    assert many['test_mean'] == pytest.approx((0.8 * 3 + 0.4 * 2 + 0.6 * 1) / 6, abs=0.005)
    assert many['val_lo'] == 0.3 and many['val_hi'] == 0.9
    # the same seed draws the same subsets for another pool of that size (paired design)
    other = mnist.best_of_k(val ** 2, test, 2, n_resamples=50, seed=3)  # same ranking, same picks
    mine = mnist.best_of_k(val, test, 2, n_resamples=50, seed=3)
    assert other['picked'] == mine['picked'] != mnist.best_of_k(val, test, 2, n_resamples=50, seed=4)['picked']
    # a diverged member (NaN) is never selected; ties go to the first drawn
    assert mnist.best_of_k([np.nan, 0.2], [0.0, 0.7], 2, 30)['test_mean'] == pytest.approx(0.7)
    tie = mnist.best_of_k([0.5, 0.5], [0.0, 1.0], 2, 4000, seed=0)
    assert tie['val_std'] == pytest.approx(0) and tie['test_mean'] == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError, match='best-of-5 needs 1 <= k <= pool size'):
        mnist.best_of_k(val, test, 5)


def test_verdict_and_pool_draws():
    assert mnist.verdict('R', (0.5, 0.01), 'G', (0.6, 0.02)) == 'G higher'
    assert mnist.verdict('R', (0.7, 0.01), 'G', (0.6, 0.02)) == 'R higher'
    assert mnist.verdict('R', (0.5, 0.06), 'G', (0.6, 0.05)) == 'overlap'
    p16 = mnist.pool_configs(4, 16)
    assert mnist.pool_configs(4, 8) == p16[:8] and p16 == mnist.pool_configs(4, 16)
    assert all(b in mnist.BATCH_SIZES and lr in mnist.LEARNING_RATES for b, lr in p16)
    assert mnist.pool_configs(8, 16) != p16 and len(set(p16)) > 3
    stack = np.random.default_rng(0).dirichlet(np.ones(10), size=(3, 50))
    pd, top1 = mnist.pairwise_pd(np.stack([stack[0], stack[0], stack[1]]))
    assert pd.shape == (3,) and pd[0] == 0 and pd[1] > 0 and top1[0] == 0


# ----------------------------------------------------------------------------- the study

def test_tiny_mnist1d_study_end_to_end(mnist1d_dir, tmp_path):
    res = str(tmp_path / 'results')
    kw = dict(widths=(2, 4), batch_sizes=(64,), lrs=(1e-2, 1e-3), ks=(2, 3), pool_size=3, n_resamples=10,
              n_seeds=2, results_dir=res, data_dir=mnist1d_dir, progress=False, log=lambda *a: None)
    s = mnist.run_study('mnist1d', **kw)
    out = os.path.join(res, 'mnist_ffn', 'mnist1d')
    assert s['counts'] == {'trained': 20, 'resumed': 0, 'diverged': 0}
    assert len(s['results']) == 4 and len(s['comparisons']) == 4
    for r in s['results']:
        assert len(r['pool']) == 3 and set(r['best_of_k']) == {'2', '3'}
        assert r['best_of_k']['3']['val_std'] == pytest.approx(0)  # k = pool size: always the pool's best
        assert r['best_of_k']['3']['val_mean'] == pytest.approx(max(p['val_accuracy'] for p in r['pool']))
        assert r['seeds']['n_pairs'] == 1 and r['seeds']['relative_pd_mean'] > 0
        rec = json.load(open(os.path.join(out, r['pool'][0]['path'])))
        assert rec['source'] == 'measured' and 'test_accuracy' in rec['metrics']
        assert rec['config']['hidden'] == r['width'] and rec['config']['max_iters'] == 47
    # the two models share the pool draws: same (batch, lr) per member
    a, b = s['results'][0], s['results'][1]
    assert [(p['batch_size'], p['learning_rate']) for p in a['pool']] == \
        [(p['batch_size'], p['learning_rate']) for p in b['pool']]
    with open(os.path.join(out, 'summary.json')) as f:
        assert json.load(f)['settings']['pool_size'] == 3
    report = open(os.path.join(out, 'REPORT.md')).read()
    assert '| 4 | 3 |' in report and 'relative PD' in report
    for png in ('accuracy_vs_width.png', 'pd_vs_width.png'):
        assert open(os.path.join(out, 'plots', png), 'rb').read(4) == b'\x89PNG'
    # resume: nothing is trained again and the numbers are the same
    again = mnist.run_study('mnist1d', **kw)
    assert again['counts'] == {'trained': 0, 'resumed': 20, 'diverged': 0}
    assert again['comparisons'] == s['comparisons']


def test_study_cli_rejects_swept_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        mnist.main(['--task', 'mnist1d', '--batch_size', '8', '--results-dir', str(tmp_path)])
    assert e.value.code == 2 and '--batch_size: set by the study' in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_results_saved_before_the_classifier_fields_existed_still_resume(mnist1d_dir, tmp_path):
    cfg = get_config('mnist_ffn')
    opts = train.RunOptions(str(tmp_path), data_dir=mnist1d_dir, progress=False)
    r = train.run_trial('ffn', 'relu', 0, cfg, 's', opts)
    path = train.trial_path(str(tmp_path), 's', 'ffn', 'relu', 0)
    # a config field added later (here: depth, at its default) is absent from an old record
    r['config'].pop('depth')
    write_json(path, r)
    assert train.run_trial('ffn', 'relu', 0, cfg, 's', opts)['provenance'] == r['provenance']
    with pytest.raises(FileExistsError, match='depth: None -> 2'):
        train.run_trial('ffn', 'relu', 0, get_config('mnist_ffn', depth=2), 's', opts)
