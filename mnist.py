"""
MNIST and MNIST-1D classification: the data, the `ffn` model, and the FFN study (issue 7):
GeGLU against ReLU feed-forward classifiers with best-of-k random search, bootstrap error
bars, held-out test accuracy and the reproducibility (PD between seeds) of the best
configuration.

Data (dataset names for Config.dataset / --dataset)
  mnist    the four standard IDX files (gzip), downloaded on first use from MNIST_URL into
           <data dir>/mnist/, each checked against its md5 on every load, parsed with numpy.
           Pixels are scaled to [0, 1] and standardised with MNIST's mean and std.
  mnist1d  MNIST-1D made locally by mnist1d.data.make_dataset with the package's default
           arguments (5000 sequences of 40 values, seed 42, 4000 train / 1000 test). That
           function downloads nothing (only mnist1d's get_dataset does) but reseeds numpy's
           and Python's global RNGs: the states are restored afterwards. The arrays are
           cached in <data dir>/mnist1d/ with their sha256, and regenerated if the cache is
           missing or does not match.
  <data dir> is --data-dir, else $REPRO_DATA_DIR, else ./data, as for the text corpus.

ClassificationTask (the Task interface of prepare_data.py, kind 'classification')
  A validation split (VAL_SIZE: 10000 of MNIST's 60000, 1000 of MNIST-1D's 4000) is carved
  from the training set by a permutation seeded with config.eval_seed; the rest is trained
  on. The reproducibility evaluation set -- whose softmax every trial saves -- is the whole
  validation split, so a trial's val_accuracy is its validation accuracy; config_updates()
  therefore sets n_eval to the split's size (with vocab_size = 10 classes, n_inputs, and,
  when config.epochs > 0, max_iters = epochs x batches per epoch). Training batches are
  epochs: a fresh permutation of the training split from the trial's data generator per
  epoch (the last batch of an epoch may be smaller). The test set is held out: it is only
  evaluated once, after training, by the task's trial_metrics() hook (test_accuracy,
  test_loss in the trial JSON).

Model `ffn` (model_factories.CLASSIFIER_NAMES)
  flatten -> [Linear(d, width) -> activation] x depth -> Linear(width, 10): `hidden` is the
  ungated width; a gated activation (geglu, swiglu, reglu) gets gated_hidden(hidden) =
  round(2/3 hidden) units, the registry's width rule. FFN_ReLU = ffn + relu, FFN_GeGLU =
  ffn + geglu. Dropout (config.dropout) after each activation; the mnist_ffn preset has none.

The study
  python mnist.py --task mnist1d          (offline, ~minutes on 2 CPU cores)
  python mnist.py --task mnist            (downloads MNIST once)
  For each model x hidden width, a pool of POOL_SIZE trials whose (batch size, learning rate)
  is drawn uniformly from the grid by a generator seeded with (pool seed, width, member):
  the same draws for both models (a paired design), and pool member j is trial j (seed
  seed_base + j) for both. Best-of-k for k in KS: the pool member with the best validation
  accuracy among k distinct members drawn at random from the pool; N_RESAMPLES bootstrap
  draws (the same draws for both models) give its mean and std, and the test accuracy of the
  member each draw selects. The default pool of 16 is twice the largest k, so a best-of-8
  draw has C(16, 8) = 12870 possible subsets rather than one. Reproducibility: the best
  configuration of each model and width over the whole pool is trained N_SEEDS more times
  (trials 1000.., seeds that no pool member uses) and the relative PD of their validation
  softmax is averaged over all pairs. Every trial goes through train.run_trial: the same
  JSON/npz layout, provenance, atomic writes and resume, under
  <results-dir>/<study>/<task>/pool/h<width>/ffn/<activation>/trial_<j>.json and
  <results-dir>/<study>/<task>/seeds/h<width>/b<batch>_lr<lr>/ffn/<activation>/trial_<1000+i>.json.
  Outputs in <results-dir>/<study>/<task>/: summary.json, REPORT.md, plots/accuracy_vs_width.png
  and plots/pd_vs_width.png (written atomically; `--report-only` redraws them from summary.json).
"""
import functools
import gzip
import hashlib
import io
import json
import math
import os
import random
import time
import zlib
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from activations import Activation, check_activation, gated_hidden
from fileio import DataError, atomic_write, data_dir, fetch_verified, write_json

# ----------------------------------------------------------------------------- constants

MNIST_URL = 'https://ossci-datasets.s3.amazonaws.com/mnist/'
MNIST_FILES = {  # key -> (file name, md5 of the .gz file, shape of the parsed array)
    'train_images': ('train-images-idx3-ubyte.gz', 'f68b3c2dcbeaaa9fbdd348bbdeb94873', (60000, 28, 28)),
    'train_labels': ('train-labels-idx1-ubyte.gz', 'd53e105ee54ea40749a09fcbcd1e9432', (60000,)),
    'test_images': ('t10k-images-idx3-ubyte.gz', '9fb629c4189551a2d022fa330f9573f3', (10000, 28, 28)),
    'test_labels': ('t10k-labels-idx1-ubyte.gz', 'ec29112dd5afa0611ce80d1b7f02629c', (10000,)),
}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
DATASETS = ('mnist', 'mnist1d')
INPUT_DIMS = {'mnist': 28 * 28, 'mnist1d': 40}
VAL_SIZE = {'mnist': 10000, 'mnist1d': 1000}
N_CLASSES = 10
MNIST1D_CACHE = 'mnist1d_default.npz'  # make_dataset(get_dataset_args()): 5000 samples, seed 42

# IDX type codes (the third magic byte) -> big-endian numpy dtypes
IDX_DTYPES = {0x08: '>u1', 0x09: '>i1', 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}

# the study
STUDY_MODELS = {'FFN_ReLU': ('ffn', 'relu'), 'FFN_GeGLU': ('ffn', 'geglu')}
WIDTHS = (2, 4, 8, 16)
BATCH_SIZES = (8, 64)
LEARNING_RATES = (1e-1, 1e-2, 1e-3, 1e-4)
KS = (2, 4, 8)
POOL_SIZE = 16          # 2 x the largest k: best-of-8 draws vary (C(16, 8) subsets)
N_RESAMPLES = 50        # bootstrap draws of best-of-k, as in the original
N_SEEDS = 5             # extra seeds of each best configuration, for PD (10 pairs)
SEED_TRIAL_OFFSET = 1000  # seed trials are numbered from here: no pool member shares a seed
STUDY_NAME = 'mnist_ffn'


# ----------------------------------------------------------------------------- IDX files

def parse_idx(data, name='IDX data'):
    """The array held by the bytes of an IDX file (gzip-compressed or not). Any deviation
    from the format -- wrong magic number, short header, missing or extra data -- is a
    DataError naming `name` and what is wrong."""
    if data[:2] == b'\x1f\x8b':  # gzip magic
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{name}: corrupt or truncated gzip data ({e}); delete the file to "
                            f"download it again") from None
    if len(data) < 4:
        raise DataError(f"{name}: truncated: {len(data)} bytes, shorter than the 4-byte IDX magic number")
    code, ndim = data[2], data[3]
    if data[:2] != b'\x00\x00' or code not in IDX_DTYPES or ndim == 0:
        raise DataError(f"{name}: not an IDX file: magic number 0x{data[:4].hex()}, expected 0x0000 "
                        f"then a type byte ({', '.join(f'{c:02x}' for c in IDX_DTYPES)}) and the "
                        f"number of dimensions (e.g. 0x00000803 for images)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated: the header of a {ndim}-dimensional IDX file needs "
                        f"{header} bytes, the file has {len(data)}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype='>u4', count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[code])
    need, have = math.prod(shape) * dtype.itemsize, len(data) - header
    if have < need:
        raise DataError(f"{name}: truncated: its header declares shape {shape} ({need:,} bytes of "
                        f"{dtype.name}) but only {have:,} bytes follow")
    if have > need:
        raise DataError(f"{name}: {have - need:,} unexpected bytes after the {need:,} bytes its "
                        f"header declares (shape {shape}); not a valid IDX file")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder('='))


def read_idx(path):
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"IDX file not found: {path}") from None
    return parse_idx(data, path)


# ----------------------------------------------------------------------------- MNIST

def mnist_path(key, directory=None, fetch=True):
    """Path of one verified MNIST file (key in MNIST_FILES), downloading it if absent."""
    fname, md5, _ = MNIST_FILES[key]
    names = ', '.join(f for f, _, _ in MNIST_FILES.values())
    return fetch_verified(directory, os.path.join('mnist', fname), MNIST_URL + fname, md5, 'md5',
                          name=f'MNIST {fname}', fetch=fetch,
                          put=f"the four MNIST files ({names}) in {os.path.join(data_dir(directory), 'mnist')}")


def load_mnist(directory=None, fetch=True):
    """{'train_x': uint8 [60000, 28, 28], 'train_y': int64, 'test_x', 'test_y', 'digest', 'info'}."""
    arrays, md5s = {}, {}
    for key, (fname, md5, shape) in MNIST_FILES.items():
        path = mnist_path(key, directory, fetch)
        a = read_idx(path)
        if a.shape != shape or a.dtype != np.uint8:
            raise DataError(f"{path}: holds {a.dtype} {a.shape}, MNIST's {fname} is uint8 {shape}")
        arrays[key], md5s[fname] = a, md5
    for split in ('train', 'test'):
        labels = arrays[f'{split}_labels']
        if labels.max() >= N_CLASSES:
            raise DataError(f"MNIST {split} labels go up to {labels.max()}; expected 0..9")
    digest = hashlib.sha256(json.dumps(md5s, sort_keys=True).encode()).hexdigest()
    return {'train_x': arrays['train_images'], 'train_y': arrays['train_labels'].astype(np.int64),
            'test_x': arrays['test_images'], 'test_y': arrays['test_labels'].astype(np.int64),
            'digest': digest,
            'info': {'source': MNIST_URL, 'md5': md5s, 'folder': os.path.join(data_dir(directory), 'mnist')}}


# ----------------------------------------------------------------------------- MNIST-1D

def _arrays_sha256(arrays):
    h = hashlib.sha256()
    for k in ('train_x', 'train_y', 'test_x', 'test_y'):
        a = np.ascontiguousarray(arrays[k])
        h.update(f'{k}:{a.dtype.str}:{a.shape}:'.encode())
        h.update(a.tobytes())
    return h.hexdigest()


def generate_mnist1d():
    """MNIST-1D from mnist1d.data.make_dataset with its default arguments. No network: only
    mnist1d's get_dataset downloads. Global numpy / random states are left as they were."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
        from importlib.metadata import version
        pkg_version = version('mnist1d')
    except ImportError as e:
        raise DataError(f"dataset mnist1d needs the mnist1d package ({e}): pip install mnist1d") from None
    args = get_dataset_args()
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        ds = make_dataset(args)  # calls np.random.seed(args.seed) and random.seed(args.seed)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = {'train_x': ds['x'].astype(np.float32), 'train_y': ds['y'].astype(np.int64),
              'test_x': ds['x_test'].astype(np.float32), 'test_y': ds['y_test'].astype(np.int64)}
    gen_args = {k: v for k, v in vars(args).items() if k != 'url'}
    return arrays, {'generator': f'mnist1d {pkg_version} make_dataset', 'args': gen_args}


def load_mnist1d(directory=None):
    """MNIST-1D arrays from the cache in <data dir>/mnist1d/, generated (~1.5 s) when the cache
    is missing or does not match its recorded sha256."""
    path = os.path.join(data_dir(directory), 'mnist1d', MNIST1D_CACHE)
    arrays = info = None
    if os.path.exists(path):
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ('train_x', 'train_y', 'test_x', 'test_y')}
                stored, info = str(z['sha256']), json.loads(str(z['info']))
            if _arrays_sha256(arrays) != stored:
                arrays = None
        except (OSError, ValueError, KeyError):
            arrays = None  # unreadable cache: make the data again
    if arrays is None:
        arrays, info = generate_mnist1d()
        digest = _arrays_sha256(arrays)
        try:
            atomic_write(path, lambda f: np.savez(f, sha256=np.array(digest), info=np.array(json.dumps(info)),
                                                 **arrays))
        except OSError:
            pass  # a read-only data folder: generate each time
    digest = _arrays_sha256(arrays)
    return {**arrays, 'digest': digest, 'info': {**info, 'cache': path}}


# ----------------------------------------------------------------------------- the task

@functools.lru_cache(maxsize=4)
def _splits(dataset, folder, val_seed):
    """Tensors of the train / validation / test splits, made once per process."""
    raw = load_mnist(folder) if dataset == 'mnist' else load_mnist1d(folder)
    n, n_val = len(raw['train_y']), VAL_SIZE[dataset]
    if not 0 < n_val < n:
        raise DataError(f"{dataset}: {n} training examples, too few to hold out {n_val} for validation")
    perm = np.random.default_rng(val_seed).permutation(n)
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    t = torch.from_numpy
    return {
        'train_x': t(raw['train_x'][train_idx]), 'train_y': t(raw['train_y'][train_idx]),
        'val_x': _features(t(raw['train_x'][val_idx])), 'val_y': t(raw['train_y'][val_idx]),
        'test_x': _features(t(raw['test_x'])), 'test_y': t(raw['test_y']),
        'val_idx': val_idx.astype(np.int64), 'digest': raw['digest'], 'info': raw['info'],
    }


def _features(x):
    """Model inputs: MNIST's uint8 pixels scaled to [0, 1] and standardised; MNIST-1D as is."""
    if x.dtype == torch.uint8:
        return (x.float() / 255.0 - MNIST_MEAN) / MNIST_STD
    return x


class ClassificationTask:
    """10-way classification of MNIST / MNIST-1D through the trainer's Task interface."""
    kind = 'classification'

    def __init__(self, config, directory=None):
        if config.dataset not in DATASETS:
            raise DataError(f"unknown classification dataset {config.dataset!r}; valid: {', '.join(DATASETS)}")
        self.dataset = config.dataset
        s = _splits(config.dataset, data_dir(directory), config.eval_seed)
        self.train_x, self.train_y = s['train_x'], s['train_y']
        self.eval_x, self.eval_y = s['val_x'], s['val_y']   # the evaluation set: the validation split
        self.test_x, self.test_y = s['test_x'], s['test_y']
        self.eval_indices = s['val_idx']                     # positions in the dataset's training set
        self.n_classes = N_CLASSES
        self.n_inputs = INPUT_DIMS[config.dataset]
        if config.vocab_size and config.vocab_size != self.n_classes:
            raise ValueError(f"vocab_size {config.vocab_size} does not match {config.dataset}'s "
                             f"{self.n_classes} classes (leave vocab_size at 0)")
        if config.n_inputs and config.n_inputs != self.n_inputs:
            raise ValueError(f"n_inputs {config.n_inputs} does not match {config.dataset}'s "
                             f"{self.n_inputs} input features (leave n_inputs at 0)")
        self._epochs, self._batch, self._accum = config.epochs, config.batch_size, config.grad_accum_steps
        h = hashlib.sha256(f'classification:{config.dataset}:{s["digest"]}:'.encode())
        h.update(self.eval_indices.tobytes())
        self.eval_hash = h.hexdigest()
        self.data_info = {'dataset': config.dataset, **s['info'], 'data_sha256': s['digest'],
                          'n_train': len(self.train_y), 'n_val': len(self.eval_y), 'n_test': len(self.test_y),
                          'n_inputs': self.n_inputs, 'n_classes': self.n_classes,
                          'val_split_seed': config.eval_seed}

    def batches_per_epoch(self, batch_size):
        return math.ceil(len(self.train_y) / batch_size)

    def config_updates(self):
        up = {'vocab_size': self.n_classes, 'n_inputs': self.n_inputs, 'n_eval': len(self.eval_y)}
        if self._epochs:
            up['max_iters'] = math.ceil(self._epochs * self.batches_per_epoch(self._batch) / self._accum)
        return up

    def train_batches(self, batch_size, generator, start=0):
        n = len(self.train_y)
        epoch, offset = divmod(start, self.batches_per_epoch(batch_size))
        for _ in range(epoch):  # a resumed stream: the permutations of the epochs it skips
            torch.randperm(n, generator=generator)
        while True:  # one permutation of the training split per epoch
            perm = torch.randperm(n, generator=generator)
            for s in range(offset * batch_size, n, batch_size):
                idx = perm[s:s + batch_size]
                yield _features(self.train_x[idx]), self.train_y[idx]
            offset = 0

    def get_batch(self, split, batch_size, generator):
        """Random examples (with replacement) of 'train' or 'val' for loss estimates."""
        if split == 'train':
            x, y = self.train_x, self.train_y
        elif split == 'val':
            x, y = self.eval_x, self.eval_y
        else:
            raise ValueError(f"unknown split {split!r}; valid: train, val")
        idx = torch.randint(len(y), (batch_size,), generator=generator)
        return _features(x[idx]), y[idx]

    def tokens_per_batch(self, batch_size):
        return batch_size  # examples

    @torch.inference_mode()
    def trial_metrics(self, model, device, amp, batch_size=1000):
        """Held-out test accuracy and loss of the trained model (trainer hook)."""
        model.eval()
        correct, loss = 0, 0.0
        for j in range(0, len(self.test_y), batch_size):
            x, y = self.test_x[j:j + batch_size].to(device), self.test_y[j:j + batch_size].to(device)
            with amp:
                logits, _ = model(x)
            logits = logits.float()
            loss += F.cross_entropy(logits, y, reduction='sum').item()
            correct += (logits.argmax(-1) == y).sum().item()
        model.train()
        n = len(self.test_y)
        return {'test_accuracy': correct / n, 'test_loss': loss / n, 'n_test': n}


# ----------------------------------------------------------------------------- the model

class FFN(nn.Module):
    """flatten -> [Linear -> activation (-> dropout)] x depth -> Linear(width, n_classes).
    forward(x, targets=None) -> (logits [B, n_classes], cross-entropy or None)."""

    def __init__(self, config, activation):
        super().__init__()
        check_activation(activation)
        d = config.n_inputs or INPUT_DIMS.get(config.dataset)
        if not d:
            raise ValueError(f"ffn is a classifier of flat inputs: set n_inputs, or use dataset "
                             f"{' or '.join(DATASETS)} (dataset is {config.dataset!r})")
        self.n_classes = config.vocab_size or N_CLASSES
        layers = []
        for _ in range(config.depth):
            act = Activation(activation)
            width = gated_hidden(config.hidden) if act.gated else config.hidden
            layers += [nn.Linear(d, width * act.in_mult, bias=config.bias), act]
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
            d = width
        self.width = d
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, self.n_classes, bias=config.bias)

    def forward(self, x, targets=None):
        logits = self.head(self.body(x.flatten(1)))
        return logits, None if targets is None else F.cross_entropy(logits, targets)


# ----------------------------------------------------------------------------- best-of-k

def best_of_k(val_acc, test_acc, k, n_resamples=N_RESAMPLES, seed=0):
    """Bootstrap of best-of-k random search over a pool of trials. Each resample draws k
    distinct pool members uniformly at random and keeps the one with the best validation
    accuracy (ties: the first drawn; a diverged member, NaN, is never preferred). Returns the
    mean / std (ddof=1) / 2.5-97.5 percentiles of the kept members' validation accuracy, the
    mean / std of their test accuracy, the exact expectation of the best validation accuracy,
    and the member picked by each resample. The same seed gives the same draws for another
    pool of the same size (a paired comparison)."""
    val, test = np.asarray(val_acc, dtype=np.float64), np.asarray(test_acc, dtype=np.float64)
    P = len(val)
    if val.shape != test.shape or val.ndim != 1:
        raise ValueError(f"need two 1-d arrays of one length, got {val.shape} and {test.shape}")
    if not 1 <= k <= P:
        raise ValueError(f"best-of-{k} needs 1 <= k <= pool size ({P})")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    draws = np.argsort(rng.random((n_resamples, P)), axis=1)[:, :k]  # k distinct members each
    scores = np.where(np.isnan(val), -np.inf, val)[draws]
    picked = draws[np.arange(n_resamples), scores.argmax(1)]
    bv, bt = val[picked], test[picked]
    return {'k': k, 'pool_size': P, 'n_resamples': n_resamples,
            'val_mean': _mean(bv), 'val_std': _std(bv),
            'val_lo': _pct(bv, 2.5), 'val_hi': _pct(bv, 97.5),
            'test_mean': _mean(bt), 'test_std': _std(bt),
            'val_expected': expected_best_of_k(val, k),
            'picked': picked.tolist(), 'best_val': bv.tolist(), 'best_test': bt.tolist()}


def expected_best_of_k(val_acc, k):
    """Exact expectation of the best validation accuracy among k distinct members drawn
    uniformly from the pool (no resampling noise): sum_i v_(i) C(i-1, k-1) / C(P, k) over
    the pool sorted ascending. None if a member diverged (NaN)."""
    v = np.sort(np.asarray(val_acc, dtype=np.float64))
    if np.isnan(v).any():
        return None
    P = len(v)
    w = np.array([math.comb(i - 1, k - 1) for i in range(1, P + 1)], dtype=np.float64) / math.comb(P, k)
    return float((w * v).sum())


def _finite(v):
    v = np.asarray(v, dtype=np.float64)
    return v[np.isfinite(v)]


def _mean(v):
    v = _finite(v)
    return float(v.mean()) if len(v) else None


def _std(v):
    v = _finite(v)
    return float(v.std(ddof=1)) if len(v) >= 2 else (0.0 if len(v) == 1 else None)


def _pct(v, q):
    v = _finite(v)
    return float(np.percentile(v, q)) if len(v) else None


def _num(x):
    return None if x is None or not math.isfinite(x) else float(x)


def interval(mean, std):
    return None if mean is None else (mean - (std or 0.0), mean + (std or 0.0))


def verdict(a_name, a, b_name, b):
    """Compare two (mean, std) error bars: 'overlap' or which is higher."""
    ia, ib = interval(*a), interval(*b)
    if ia is None or ib is None:
        return 'n/a'
    if ia[1] < ib[0]:
        return f'{b_name} higher'
    if ib[1] < ia[0]:
        return f'{a_name} higher'
    return 'overlap'


# ----------------------------------------------------------------------------- pool and PD

def pool_configs(width, pool_size=POOL_SIZE, batch_sizes=BATCH_SIZES, lrs=LEARNING_RATES, seed=0):
    """[(batch_size, learning_rate)] of pool members 0..pool_size-1 for one width. Member j
    depends only on (seed, width, j): a larger pool keeps the smaller pool's members."""
    out = []
    for j in range(pool_size):
        rng = np.random.default_rng([seed, width, j])
        out.append((int(batch_sizes[rng.integers(len(batch_sizes))]), float(lrs[rng.integers(len(lrs))])))
    return out


def pairwise_pd(stack):
    """Relative PD and top-1 disagreement of every pair of a stack of softmax outputs
    [n_trials, n, C] (metrics.py's vectorised per-pair functions)."""
    from metrics import relative_pd, top1_disagreement
    stack = np.asarray(stack)
    i, j = np.triu_indices(len(stack), k=1)
    if not len(i):
        return np.zeros(0), np.zeros(0)
    return (np.asarray(relative_pd(stack[i], stack[j]), dtype=np.float64),
            np.asarray(top1_disagreement(stack[i], stack[j]), dtype=np.float64))


# ----------------------------------------------------------------------------- the study

def _fmt_lr(lr):
    return f'{lr:g}'


def run_study(task='mnist1d', base_config=None, widths=WIDTHS, models=tuple(STUDY_MODELS),
              batch_sizes=BATCH_SIZES, lrs=LEARNING_RATES, ks=KS, pool_size=POOL_SIZE,
              n_resamples=N_RESAMPLES, n_seeds=N_SEEDS, pool_seed=0, bootstrap_seed=0,
              results_dir='results', study=STUDY_NAME, vary='all', device='auto', dtype='auto',
              deterministic=False, data_dir=None, force=False, threads=None, progress=True,
              log=print):
    """Train (or resume) every trial of the study through train.run_trial, then write
    summary.json, REPORT.md and the plots into <results_dir>/<study>/<task>/. Returns the
    summary."""
    import train
    from config import get_config

    t0 = time.time()
    if task not in DATASETS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(DATASETS)}")
    unknown = [m for m in models if m not in STUDY_MODELS]
    if unknown:
        raise ValueError(f"unknown study model(s) {', '.join(unknown)}; valid: {', '.join(STUDY_MODELS)}")
    ks = sorted(set(ks))
    if not widths or not ks or min(widths) < 1:
        raise ValueError("need at least one width (>= 1) and one k")
    if not ks[0] >= 1 or ks[-1] > pool_size:
        raise ValueError(f"every k must be in 1..pool size ({pool_size}), got {ks}")
    if not 1 <= pool_size <= SEED_TRIAL_OFFSET:
        raise ValueError(f"pool size must be in 1..{SEED_TRIAL_OFFSET}, got {pool_size}")
    if n_seeds < 0 or n_resamples < 1:
        raise ValueError("n_seeds must be >= 0 and n_resamples >= 1")
    base = replace(base_config or get_config(STUDY_NAME), dataset=task).validate()
    out_dir = os.path.join(results_dir, study, task)
    n_total = len(models) * len(widths) * (pool_size + n_seeds)
    bar = train._progress(n_total, f'{study}/{task}', progress)
    counts = {'trained': 0, 'resumed': 0, 'diverged': 0}
    train_seconds = all_seconds = 0.0

    def trial(model_label, cfg, k, sub):
        nonlocal train_seconds, all_seconds
        model, act = STUDY_MODELS[model_label]
        sub_study = os.path.join(study, task, sub)
        path = train.trial_path(results_dir, sub_study, model, act, k)
        existed = os.path.exists(path)
        try:
            r = train.run_trial(model, act, k, cfg, sub_study, train.RunOptions(
                results_dir, vary, device, dtype, deterministic, data_dir=data_dir, progress=False,
                force=force, threads=threads))
        except train.TrainingError as e:  # a diverged configuration: never selected
            counts['diverged'] += 1
            bar.update(1)
            return {'trial': k, 'diverged': True, 'error': str(e), 'val_accuracy': None,
                    'test_accuracy': None, 'path': None, 'npz': None, 'eval_hash': None}
        if existed and not force:
            counts['resumed'] += 1
        else:
            counts['trained'] += 1
            train_seconds += r['metrics']['total_time']
        all_seconds += r['metrics']['total_time']  # as measured when the trial was trained
        bar.update(1)
        m = r['metrics']
        return {'trial': k, 'diverged': False, 'val_accuracy': m['val_accuracy'],
                'test_accuracy': m['test_accuracy'], 'val_loss': m['val_loss'],
                'n_params': m['n_params'], 'iters': m['iters'], 'total_time': m['total_time'],
                'path': os.path.relpath(path, out_dir), 'npz': path[:-len('json')] + 'npz',
                'eval_hash': r['eval_hash'], 'provenance': r['provenance']}

    results, provenance = [], None
    for width in widths:
        configs = pool_configs(width, pool_size, batch_sizes, lrs, pool_seed)
        for model_label in models:
            pool = []
            for j, (b, lr) in enumerate(configs):
                cfg = replace(base, hidden=width, batch_size=b, learning_rate=lr)
                rec = trial(model_label, cfg, j, os.path.join('pool', f'h{width}'))
                pool.append({**rec, 'batch_size': b, 'learning_rate': lr})
            val = np.array([np.nan if p['diverged'] else p['val_accuracy'] for p in pool])
            test = np.array([np.nan if p['diverged'] else p['test_accuracy'] for p in pool])
            entry = {'model': model_label, 'width': width,
                     'n_params': next((p['n_params'] for p in pool if not p['diverged']), None),
                     'best_of_k': {}, 'seeds': None}
            for k in ks:
                # the same draws for every model of this width and k: a paired comparison
                bk = best_of_k(val, test, k, n_resamples, seed=[bootstrap_seed, width, k])
                entry['best_of_k'][str(k)] = {**bk, 'best_val': [_num(x) for x in bk['best_val']],
                                              'best_test': [_num(x) for x in bk['best_test']]}
            if np.isfinite(val).any():
                jb = int(np.nanargmax(val))  # ties: the lowest member
                best = pool[jb]
                entry['best_config'] = {'member': jb, 'batch_size': best['batch_size'],
                                        'learning_rate': best['learning_rate'],
                                        'val_accuracy': best['val_accuracy'],
                                        'test_accuracy': best['test_accuracy']}
                seeds = []
                sub = os.path.join('seeds', f'h{width}', f"b{best['batch_size']}_lr{_fmt_lr(best['learning_rate'])}")
                cfg = replace(base, hidden=width, batch_size=best['batch_size'],
                              learning_rate=best['learning_rate'])
                for i in range(n_seeds):
                    seeds.append(trial(model_label, cfg, SEED_TRIAL_OFFSET + i, sub))
                entry['seeds'] = _seed_view(seeds)
            else:
                entry['best_config'] = None
                bar.update(n_seeds)
            provenance = provenance or next((p['provenance'] for p in pool if not p['diverged']), None)
            for p in pool:
                p.pop('provenance', None)
                p.pop('npz', None)
            entry['pool'] = pool
            results.append(entry)
            bk_last = entry['best_of_k'][str(ks[-1])]
            log(f"{task} {model_label:9s} width {width:3d}: pool best val acc "
                f"{np.nanmax(val) if np.isfinite(val).any() else float('nan'):.4f}, best-of-{ks[-1]} "
                f"{_show(bk_last['val_mean'], bk_last['val_std'])}"
                + (f", PD {_show(entry['seeds']['relative_pd_mean'], entry['seeds']['relative_pd_std'])}"
                   if entry['seeds'] and entry['seeds']['relative_pd_mean'] is not None else ''))
    bar.close()

    summary = {
        'schema_version': 1, 'source': 'measured', 'study': study, 'task': task,
        'settings': {'models': {m: {'model': STUDY_MODELS[m][0], 'activation': STUDY_MODELS[m][1]} for m in models},
                     'widths': list(widths), 'batch_sizes': list(batch_sizes), 'learning_rates': list(lrs),
                     'ks': ks, 'pool_size': pool_size, 'n_resamples': n_resamples, 'n_seeds': n_seeds,
                     'pool_seed': pool_seed, 'bootstrap_seed': bootstrap_seed, 'vary': vary,
                     'deterministic': deterministic, 'epochs': base.epochs, 'depth': base.depth,
                     'base_config': base.to_dict()},
        'results': results,
        'comparisons': _comparisons(results, models, widths, ks),
        'counts': counts,
        'timing': {'wall_seconds': time.time() - t0, 'trial_seconds_trained': train_seconds,
                   'trial_seconds_all': all_seconds},
        'provenance': provenance,
    }
    write_outputs(summary, out_dir)
    return summary


def _seed_view(seeds):
    ok = [s for s in seeds if not s['diverged']]
    view = {'n': len(seeds), 'n_ok': len(ok), 'trials': [s['trial'] for s in ok],
            'val_accuracy_mean': _mean([s['val_accuracy'] for s in ok]),
            'val_accuracy_std': _std([s['val_accuracy'] for s in ok]),
            'test_accuracy_mean': _mean([s['test_accuracy'] for s in ok]),
            'test_accuracy_std': _std([s['test_accuracy'] for s in ok]),
            'relative_pd_mean': None, 'relative_pd_std': None, 'top1_disagreement_mean': None,
            'n_pairs': 0, 'paths': [s['path'] for s in ok]}
    if len(ok) >= 2:
        if len({s['eval_hash'] for s in ok}) != 1:
            raise ValueError("seed trials were evaluated on different inputs (eval_hash differs)")
        stack = []
        for s in ok:
            with np.load(s['npz']) as z:
                stack.append(z['probs'])
        pd, top1 = pairwise_pd(np.stack(stack))
        view.update(relative_pd_mean=_mean(pd), relative_pd_std=_std(pd),
                    top1_disagreement_mean=_mean(top1), n_pairs=len(pd))
    return view


def _comparisons(results, models, widths, ks):
    """Per width and k: the two models' error bars (mean +- std over bootstrap resamples),
    whether they overlap, and the paired resample-by-resample difference."""
    if len(models) != 2:
        return []
    a, b = models  # (FFN_ReLU, FFN_GeGLU) by default: differences are b - a
    by = {(r['model'], r['width']): r for r in results}
    out = []
    for w in widths:
        for k in ks:
            ra, rb = by[(a, w)]['best_of_k'][str(k)], by[(b, w)]['best_of_k'][str(k)]
            row = {'width': w, 'k': k, 'a': a, 'b': b}
            for split in ('val', 'test'):
                row[f'{split}_verdict'] = verdict(a, (ra[f'{split}_mean'], ra[f'{split}_std']),
                                                  b, (rb[f'{split}_mean'], rb[f'{split}_std']))
                xa = np.array([np.nan if v is None else v for v in ra[f'best_{split}']])
                xb = np.array([np.nan if v is None else v for v in rb[f'best_{split}']])
                d = xb - xa
                row[f'{split}_diff_mean'] = _mean(d)
                row[f'{split}_diff_std'] = _std(d)
                dd = _finite(d)
                row[f'{split}_b_wins'] = float((dd > 0).mean()) if len(dd) else None
            out.append(row)
    return out


# ----------------------------------------------------------------------------- report and plots

def _show(mean, std, digits=4):
    if mean is None:
        return 'n/a'
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def _label(m):
    return m.replace('FFN_', '')


def report_section(summary):
    """The study's REPORT.md section (markdown), from the summary alone."""
    s, st = summary, summary['settings']
    models = list(st['models'])
    by = {(r['model'], r['width']): r for r in s['results']}
    t = s['timing']
    prov = s.get('provenance') or {}
    lines = [
        f"## FFN study on {s['task']}: {' vs '.join(models)} (best-of-k random search)", '',
        f"Source: measured. Feed-forward classifiers (`ffn`, depth {st['depth']}, {st['epochs']} epoch(s), "
        f"AdamW with weight decay {st['base_config']['weight_decay']:g}) on `{s['task']}`; widths {', '.join(map(str, st['widths']))} (gated activations use "
        f"round(2/3 x width) units). Per model and width a pool of {st['pool_size']} trials, each with "
        f"(batch size, learning rate) drawn uniformly from {st['batch_sizes']} x {st['learning_rates']} "
        f"(the same draws and seeds for both models). Best-of-k = the pool member with the best "
        f"validation accuracy among k distinct members drawn at random; {st['n_resamples']} bootstrap "
        f"draws (the same for both models) give mean ± std. \"Test\" is the held-out test accuracy of "
        f"the member each draw selects. Verdict: do the mean ± std error bars of the two models "
        f"overlap? \"wins\": fraction of the paired draws in which {_label(models[-1])} is strictly "
        f"better on validation.", '',
    ]
    if len(models) == 2 and s['comparisons']:
        a, b = models
        lines += [f"| width | k | {_label(a)} best val | {_label(b)} best val | val verdict | "
                  f"{_label(a)} test | {_label(b)} test | test verdict | {_label(b)} wins |",
                  '|---:|---:|---|---|---|---|---|---|---:|']
        for c in s['comparisons']:
            ra = by[(a, c['width'])]['best_of_k'][str(c['k'])]
            rb = by[(b, c['width'])]['best_of_k'][str(c['k'])]
            wins = 'n/a' if c['val_b_wins'] is None else f"{c['val_b_wins']:.0%}"
            lines.append(f"| {c['width']} | {c['k']} | {_show(ra['val_mean'], ra['val_std'])} | "
                         f"{_show(rb['val_mean'], rb['val_std'])} | {c['val_verdict']} | "
                         f"{_show(ra['test_mean'], ra['test_std'])} | {_show(rb['test_mean'], rb['test_std'])} | "
                         f"{c['test_verdict']} | {wins} |")
    else:
        lines += ['| model | width | k | best val | test |', '|---|---:|---:|---|---|']
        for r in s['results']:
            for k, bk in r['best_of_k'].items():
                lines.append(f"| {r['model']} | {r['width']} | {k} | {_show(bk['val_mean'], bk['val_std'])} | "
                             f"{_show(bk['test_mean'], bk['test_std'])} |")
    lines += ['', f"Reproducibility of the best configuration (best validation accuracy over the whole "
                  f"pool) of each model and width: {st['n_seeds']} more seeds (--vary {st['vary']}); relative "
                  f"PD and top-1 disagreement of their validation softmax, mean ± std over all pairs.", '',
              '| model | width | params | best config (batch, lr) | seeds | val acc | test acc | relative PD | top-1 disagreement |',
              '|---|---:|---:|---|---:|---|---|---|---:|']
    for r in s['results']:
        bc, sv = r.get('best_config'), r.get('seeds')
        cfg = 'all diverged' if bc is None else f"{bc['batch_size']}, {bc['learning_rate']:g}"
        if sv:
            lines.append(f"| {r['model']} | {r['width']} | {r['n_params']} | {cfg} | {sv['n_ok']} | "
                         f"{_show(sv['val_accuracy_mean'], sv['val_accuracy_std'])} | "
                         f"{_show(sv['test_accuracy_mean'], sv['test_accuracy_std'])} | "
                         f"{_show(sv['relative_pd_mean'], sv['relative_pd_std'])} | "
                         f"{_show(sv['top1_disagreement_mean'], None)} |")
        else:
            lines.append(f"| {r['model']} | {r['width']} | {r['n_params']} | {cfg} | 0 | n/a | n/a | n/a | n/a |")
    if s['comparisons']:
        lines += ['', 'Verdicts (validation): ' + '; '.join(
            f"k={k}: " + ', '.join(f"w{c['width']} {c['val_verdict']}" for c in s['comparisons'] if c['k'] == k)
            for k in st['ks']) + '.']
    c = s['counts']
    lines += ['', f"Caveats: the bootstrap resamples one finite pool, so its spread is how much the "
                  f"best-of-k draw varies given that pool, not how much a fresh pool would vary; for k "
                  f"close to the pool size the draws overlap heavily and the spread shrinks. Error bars "
                  f"are ± 1 std of the draws, not confidence intervals.",
              '', f"Trials: {c['trained']} trained, {c['resumed']} resumed, {c['diverged']} diverged "
                  f"(never selected). This run: {t['wall_seconds']:.0f} s wall, {t['trial_seconds_trained']:.0f} s "
                  f"in trials it trained; all trials' own all-in time, as measured when each was trained: "
                  f"{t.get('trial_seconds_all', float('nan')):.0f} s; on {prov.get('device_name', '?')} ({prov.get('device', '?')}, "
                  f"{prov.get('threads', '?')} threads, torch {prov.get('torch_version', '?')}).",
              '', '![accuracy vs width](plots/accuracy_vs_width.png)', '', '![PD vs width](plots/pd_vs_width.png)', '']
    return '\n'.join(lines)


def plot_accuracy_vs_width(summary):
    """One panel per k: best-of-k validation accuracy (solid) and the selected configuration's
    test accuracy (dashed) against hidden width, one line per model, ± std error bars."""
    from matplotlib.figure import Figure
    st = summary['settings']
    ks = st['ks']
    fig = Figure(figsize=(4.2 * len(ks), 3.6))
    axes = fig.subplots(1, len(ks), sharey=True, squeeze=False)[0]
    colors = {m: f'C{i}' for i, m in enumerate(st['models'])}
    for ax, k in zip(axes, ks):
        for i, m in enumerate(st['models']):
            rows = sorted((r for r in summary['results'] if r['model'] == m), key=lambda r: r['width'])
            w = [r['width'] * _dodge(i, len(st['models'])) for r in rows]
            for split, style, alpha in (('val', '-', 1.0), ('test', '--', 0.6)):
                mean = [_nan(r['best_of_k'][str(k)][f'{split}_mean']) for r in rows]
                std = [_nan(r['best_of_k'][str(k)][f'{split}_std']) for r in rows]
                ax.errorbar(w, mean, yerr=std, fmt='o' + style, color=colors[m], alpha=alpha, capsize=3,
                            label=f'{m} ({"best val" if split == "val" else "test of selected"})')
        ax.set_xscale('log', base=2)
        ax.set_xticks(st['widths'], [str(x) for x in st['widths']])
        ax.set_title(f'best-of-{k}')
        ax.set_xlabel('hidden width')
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('accuracy')
    axes[-1].legend(fontsize=7, loc='lower right')
    fig.suptitle(f"{summary['task']}: accuracy vs hidden width ({st['n_resamples']} bootstrap draws, "
                 f"pool {st['pool_size']})", fontsize=10)
    fig.tight_layout()
    return fig


def plot_pd_vs_width(summary):
    from matplotlib.figure import Figure
    st = summary['settings']
    fig = Figure(figsize=(5, 3.6))
    ax = fig.subplots()
    for i, m in enumerate(st['models']):
        rows = sorted((r for r in summary['results'] if r['model'] == m and r.get('seeds')),
                      key=lambda r: r['width'])
        ax.errorbar([r['width'] * _dodge(i, len(st['models'])) for r in rows], [_nan(r['seeds']['relative_pd_mean']) for r in rows],
                    yerr=[_nan(r['seeds']['relative_pd_std']) for r in rows], fmt='o-', color=f'C{i}',
                    capsize=3, label=m)
    ax.set_xscale('log', base=2)
    ax.set_xticks(st['widths'], [str(x) for x in st['widths']])
    ax.set_xlabel('hidden width')
    ax.set_ylabel('relative PD between seeds')
    ax.set_title(f"{summary['task']}: PD of the best configuration ({st['n_seeds']} seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _dodge(i, n):
    """Multiplicative x offset of line i of n on a log axis, so error bars do not overlap."""
    return 2 ** (0.06 * (i - (n - 1) / 2))


def _nan(x):
    return float('nan') if x is None else x


def write_outputs(summary, out_dir, plots=True):
    """summary.json, REPORT.md and (if plots) plots/*.png in out_dir, each atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    write_json(os.path.join(out_dir, 'summary.json'), summary)
    atomic_write(os.path.join(out_dir, 'REPORT.md'), lambda f: f.write(report_section(summary).encode()))
    if plots:
        for name, make in (('accuracy_vs_width', plot_accuracy_vs_width), ('pd_vs_width', plot_pd_vs_width)):
            fig = make(summary)
            FigureCanvasAgg(fig)
            buf = io.BytesIO()
            fig.savefig(buf, format='png', dpi=120, bbox_inches='tight')
            atomic_write(os.path.join(out_dir, 'plots', f'{name}.png'), lambda f: f.write(buf.getvalue()))


# ----------------------------------------------------------------------------- command line

SWEPT = ('dataset', 'hidden', 'batch_size', 'learning_rate')


def main(argv=None):
    """python mnist.py --task mnist1d [...]: the FFN study (see the module docstring)."""
    from config import Parser, config_from_args
    from train import TrainingError, add_run_args, resolve_device
    parser = Parser(description='FFN study: GeGLU vs ReLU feed-forward classifiers on MNIST / MNIST-1D '
                                'with best-of-k random search and bootstrap error bars.')
    parser.add_argument('--task', default='mnist', choices=DATASETS,
                        help='mnist (downloaded once) or mnist1d (generated offline)')
    parser.add_argument('--models', nargs='+', default=list(STUDY_MODELS), choices=list(STUDY_MODELS))
    parser.add_argument('--widths', nargs='+', type=int, default=list(WIDTHS))
    parser.add_argument('--batch-sizes', nargs='+', type=int, default=list(BATCH_SIZES))
    parser.add_argument('--lrs', nargs='+', type=float, default=list(LEARNING_RATES))
    parser.add_argument('--ks', nargs='+', type=int, default=list(KS))
    parser.add_argument('--pool-size', type=int, default=POOL_SIZE)
    parser.add_argument('--n-resamples', type=int, default=N_RESAMPLES)
    parser.add_argument('--n-seeds', type=int, default=N_SEEDS, help='extra seeds of each best config (PD)')
    parser.add_argument('--pool-seed', type=int, default=0)
    parser.add_argument('--bootstrap-seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=None, help='CPU threads (default: all cores)')
    parser.add_argument('--report-only', action='store_true',
                        help='redraw REPORT.md and the plots from an existing summary.json')
    add_run_args(parser)
    parser.set_defaults(config=STUDY_NAME, study=STUDY_NAME)
    args = parser.parse_args(argv)
    out_dir = os.path.join(args.results_dir, args.study, args.task)
    if args.report_only:
        try:
            with open(os.path.join(out_dir, 'summary.json')) as f:
                summary = json.load(f)
        except (OSError, ValueError) as e:
            parser.exit(1, f"error: no readable summary in {out_dir} ({e})\n")
        write_outputs(summary, out_dir)
        print(report_section(summary))
        return summary
    try:
        given = [f'--{k}' for k in SWEPT if getattr(args, k) is not None]
        if args.data is not None:
            given.append('--data')
        if given:
            raise ValueError(f"{', '.join(given)}: set by the study (use --task, --widths, --batch-sizes, --lrs)")
        config = config_from_args(args)
        resolve_device(args.device)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    try:
        summary = run_study(args.task, config, args.widths, args.models, args.batch_sizes, args.lrs,
                            args.ks, args.pool_size, args.n_resamples, args.n_seeds, args.pool_seed,
                            args.bootstrap_seed, args.results_dir, args.study, args.vary, args.device,
                            args.dtype, args.deterministic, args.data_dir, args.force, args.threads)
    except (DataError, ValueError, FileExistsError, TrainingError) as e:
        parser.exit(1, f"error: {e}\n")
    print()
    print(report_section(summary))
    print(f"wrote {out_dir}/summary.json, REPORT.md, plots/ in {summary['timing']['wall_seconds']:.0f} s")
    return summary


if __name__ == '__main__':
    import mnist  # one module object, shared with model_factories / prepare_data
    mnist.main()
