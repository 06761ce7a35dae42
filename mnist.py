"""
MNIST and MNIST-1D data: IDX files, the verified MNIST download, MNIST-1D generation, and the
classification task through which train.py sees them. Data only: the `ffn` model lives in
model.py, the FFN study is the `mnist_ffn` design of designs.py.

Datasets (Config.dataset / --dataset; the mnist_ffn design's --task)
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
  when config.epochs > 0, max_iters = epochs x batches per epoch); an n_eval that is neither
  Config's default nor that size is refused rather than ignored. Training batches are
  epochs: a fresh permutation of the training split from the trial's data generator per
  epoch (the last batch of an epoch may be smaller). The test set is held out: it is only
  evaluated once, after training, by the task's trial_metrics() hook (test_accuracy,
  test_loss in the trial JSON).
"""
import functools
import gzip
import hashlib
import json
import math
import os
import random
import zlib
from importlib.metadata import version

import numpy as np
import torch
import torch.nn.functional as F

from config import CLASSIFICATION_DATASETS, Config
from fileio import DataError, atomic_write, data_dir, fetch_verified

N_EVAL_DEFAULT = Config.n_eval  # n_eval left at this means "the whole validation split" here

# ----------------------------------------------------------------------------- constants

MNIST_URL = 'https://ossci-datasets.s3.amazonaws.com/mnist/'
MNIST_FILES = {  # key -> (file name, md5 of the .gz file, shape of the parsed array)
    'train_images': ('train-images-idx3-ubyte.gz', 'f68b3c2dcbeaaa9fbdd348bbdeb94873', (60000, 28, 28)),
    'train_labels': ('train-labels-idx1-ubyte.gz', 'd53e105ee54ea40749a09fcbcd1e9432', (60000,)),
    'test_images': ('t10k-images-idx3-ubyte.gz', '9fb629c4189551a2d022fa330f9573f3', (10000, 28, 28)),
    'test_labels': ('t10k-labels-idx1-ubyte.gz', 'ec29112dd5afa0611ce80d1b7f02629c', (10000,)),
}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
DATASETS = CLASSIFICATION_DATASETS  # config.py decides what is a classification task
INPUT_DIMS = {'mnist': 28 * 28, 'mnist1d': 40}
VAL_SIZE = {'mnist': 10000, 'mnist1d': 1000}
N_CLASSES = 10
MNIST1D_CACHE = 'mnist1d_default.npz'  # make_dataset(get_dataset_args()): 5000 samples, seed 42

# IDX type codes (the third magic byte) -> big-endian numpy dtypes
IDX_DTYPES = {0x08: '>u1', 0x09: '>i1', 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}


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
    # mnist1d is an optional dependency needed only here, not a cycle: imported when MNIST-1D
    # is asked for, so the language-model path runs where it is not installed (a GPU image)
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise DataError("dataset mnist1d needs the package mnist1d, which is not installed: "
                        "pip install mnist1d (or use --dataset mnist / a text corpus)") from None
    pkg_version = version('mnist1d')
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
        if config.n_eval not in (len(self.eval_y), N_EVAL_DEFAULT):  # the default: "the whole split"
            raise DataError(f"n_eval {config.n_eval}: on {config.dataset} the evaluation set is the whole "
                            f"validation split, {len(self.eval_y)} examples; leave --n_eval at its default "
                            f"({N_EVAL_DEFAULT}) or set it to {len(self.eval_y)}")
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
