"""MNIST / MNIST-1D data: IDX parsing and checksums on files the tests write (never the real
MNIST), the classification task, and the ffn model (model.py) with its gated widths. The FFN
study (the mnist_ffn design) is tested in test_ffn_study.py."""
import gzip
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

import fileio
import mnist
import train
from config import get_config
from conftest import idx_bytes, trial_path
from model import FFN
from model_factories import CLASSIFIER_NAMES, MODEL_NAMES, build_model, check_model, count_parameters
from fileio import DataError, write_json
from prepare_data import make_task
from config import RunOptions


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


def test_mnist_trial_with_tiny_files(tiny_mnist, tmp_path):
    cfg = get_config('mnist_ffn', dataset='mnist', batch_size=8, eval_interval=2, eval_iters=2)
    task = make_task(cfg, tiny_mnist)
    assert (len(task.train_y), len(task.eval_y), len(task.test_y)) == (40, 20, 20)
    assert task.config_updates() == {'vocab_size': 10, 'n_inputs': 784, 'n_eval': 20, 'max_iters': 5}
    assert abs(float(task.eval_x.mean())) < 5  # standardised pixels, not raw bytes
    r = train.run_trial('ffn', 'relu', 0, cfg, 's', RunOptions(str(tmp_path / 'res'), data_dir=tiny_mnist,
                                                                      progress=False))
    m = r['metrics']
    assert m['iters'] == 5 and 0 <= m['test_accuracy'] <= 1 and m['n_test'] == 20
    assert r['data']['md5']['train-images-idx3-ubyte.gz'] == mnist.MNIST_FILES['train_images'][1]
    with np.load(trial_path(str(tmp_path / 'res'), 's', 'ffn', 'relu', 0, 'npz')) as z:
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

def ffn_config(**kw):
    """The mnist_ffn preset with the sizes a task would set (MNIST-1D: 40 inputs, 10 classes)."""
    return replace(get_config('mnist_ffn', **kw), n_inputs=40, vocab_size=10)


def test_ffn_model_widths_and_registry():
    assert CLASSIFIER_NAMES == ['ffn'] and 'ffn' not in MODEL_NAMES
    with pytest.raises(ValueError) as e:
        check_model('mlp')
    assert all(m in str(e.value) for m in MODEL_NAMES + ['ffn'])
    cfg = ffn_config(hidden=2)
    relu, geglu = build_model('ffn', 'relu', cfg, seed=0), build_model('ffn', 'geglu', cfg, seed=0)
    assert relu.body[0].weight.shape == (2, 40) and relu.head.weight.shape == (10, 2)
    # gated width 'same' (the default, the original FFN_GeGLU): 2 gated units, whose gate and
    # value come from one Linear(40, 2 x 2)
    assert geglu.body[0].weight.shape == (4, 40) and geglu.head.weight.shape == (10, 2)
    assert (count_parameters(relu), count_parameters(geglu)) == (112, 194)
    assert geglu.trial_metrics() == {'ffn_units': 2}
    deep = build_model('ffn', 'swiglu', replace(ffn_config(hidden=16, depth=3), n_inputs=784), seed=0)
    assert [l.weight.shape for l in deep.modules() if isinstance(l, torch.nn.Linear)] == \
        [(32, 784), (32, 16), (32, 16), (10, 16)]
    x = torch.randn(5, 28, 28)
    logits, loss = deep(x, torch.arange(5))
    assert logits.shape == (5, 10) and torch.isfinite(loss) and deep(x)[1] is None
    # same seed -> same weights; another seed -> others
    assert torch.equal(build_model('ffn', 'relu', cfg, seed=0).head.weight, relu.head.weight)
    assert not torch.equal(build_model('ffn', 'relu', cfg, seed=1).head.weight, relu.head.weight)
    # the input size and classes come from the config (the task sets them), never from a dataset name
    with pytest.raises(ValueError, match='ffn needs n_inputs and vocab_size'):
        build_model('ffn', 'relu', get_config('mnist_ffn'))


@pytest.mark.parametrize('depth', [1, 2])
def test_matched_gated_width_is_the_closest_real_parameter_count(depth):
    for hidden in (2, 4, 8, 16, 33):
        cfg = ffn_config(hidden=hidden, depth=depth, gated_width='matched')
        target = count_parameters(build_model('ffn', 'relu', cfg))
        model = build_model('ffn', 'geglu', cfg)
        # brute force over unit counts, on models really built: the chosen one is the closest
        counts = {u: count_parameters(FFN(cfg, 'geglu', u)) for u in range(1, 2 * hidden + 1)}
        best = min(counts, key=lambda u: (abs(counts[u] - target), u))
        assert model.units == best and count_parameters(model) == counts[best]
        assert model.units < hidden  # a gated unit costs more than an ungated one
    assert build_model('ffn', 'geglu', ffn_config(hidden=2, gated_width='matched')).units == 1  # 102 vs 112
    assert build_model('ffn', 'relu', ffn_config(hidden=8, gated_width='matched')).units == 8  # ungated: as is
    with pytest.raises(ValueError, match="unknown gated_width 'half'; valid: same, matched"):
        get_config('mnist_ffn', gated_width='half')


def test_model_and_task_kinds_must_match(mnist1d_dir, tiny_corpus, tmp_path):
    with pytest.raises(ValueError, match="model 'minigpt' trains on lm data, but dataset 'mnist1d'"):
        train.run_trial('minigpt', 'gelu', 0, get_config('mnist_ffn'), None,
                        RunOptions(str(tmp_path), data_dir=mnist1d_dir, progress=False))
    with pytest.raises(ValueError, match="model 'ffn' trains on classification data"):
        train.run_trial('ffn', 'relu', 0, get_config('cpu', dataset=tiny_corpus, n_eval=24), None,
                        RunOptions(str(tmp_path), progress=False))
    assert not list(tmp_path.rglob('*.json'))


def test_results_saved_before_the_classifier_fields_existed_still_resume(mnist1d_dir, tmp_path):
    cfg = get_config('mnist_ffn')
    opts = RunOptions(str(tmp_path), data_dir=mnist1d_dir, progress=False)
    r = train.run_trial('ffn', 'relu', 0, cfg, 's', opts)
    path = trial_path(str(tmp_path), 's', 'ffn', 'relu', 0)
    # a config field added later (here: depth and gated_width, at their defaults) is absent from an old record
    r['config'].pop('depth')
    r['config'].pop('gated_width')
    write_json(path, r)
    assert train.run_trial('ffn', 'relu', 0, cfg, 's', opts)['provenance'] == r['provenance']
    with pytest.raises(FileExistsError, match='depth: None -> 2'):
        train.run_trial('ffn', 'relu', 0, get_config('mnist_ffn', depth=2), 's', opts)
