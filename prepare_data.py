"""
Data: the Tiny Shakespeare corpus (downloaded once, checked by sha256), any UTF-8 text
file, and the Task objects through which train.py sees a dataset.

A Task gives the trainer everything that depends on the data:
    n_classes, config_updates()        config fields the data fixes (vocab_size, ...)
    train_batches(batch_size, gen, start=0)
                                       iterator of training (x, y) CPU tensors; from batch
                                       `start` on of the stream `gen` (in its state now)
                                       gives: a resumed trial restarts its stream bitwise
    get_batch(split, batch_size, gen)  (x, y) for loss estimates; stateless, so estimating
                                       a loss never disturbs the training stream
    eval_x, eval_y, eval_indices       the fixed reproducibility evaluation set
    eval_hash                          identifies those inputs; equal for every trial of a study
    kind                               'lm' (logits [B, T, V]) or 'classification' ([B, C])
so a classification task plugs into the same trainer as the character LMs.

Data location: --data-dir, else $REPRO_DATA_DIR, else ./data. The corpus lives at
<data dir>/tinyshakespeare/input.txt. `python prepare_data.py` downloads it.
"""
import argparse
import functools
import hashlib
import os
import sys

import numpy as np
import torch

from fileio import DATA_DIR_ENV, DataError, fetch_verified
from config import CLASSIFICATION_DATASETS as CLASSIFICATION, task_kind
from mnist import ClassificationTask  # flat-input classification tasks

SHAKESPEARE_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
SHAKESPEARE_SHA256 = '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'
BUILTIN_TEXT = ('shakespeare_char',)


def shakespeare_path(directory=None, fetch=True):
    """Path of the verified Tiny Shakespeare corpus, downloading it if absent."""
    return fetch_verified(directory, os.path.join('tinyshakespeare', 'input.txt'), SHAKESPEARE_URL,
                          SHAKESPEARE_SHA256, 'sha256', name='Tiny Shakespeare', fetch=fetch)


class CharCorpus:
    """A text encoded as character ids: first 90% train, last 10% validation."""

    def __init__(self, path):
        try:
            with open(path, 'rb') as f:
                raw = f.read()
            # a byte-order mark is an encoding marker, not a character of the text: utf-8-sig
            # drops one at the start (and only there) so it never enters the vocabulary
            text = raw.decode('utf-8-sig')
        except FileNotFoundError:
            raise DataError(f"text file not found: {path}") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text ({e})") from None
        if len(text) < 2:
            raise DataError(f"{path} holds {len(text)} characters; a corpus needs many more")
        self.path = path
        self.sha256 = hashlib.sha256(raw).hexdigest()
        # vectorised encoding: code points -> sorted unique characters and their ids
        codes = np.frombuffer(text.encode('utf-32-le'), dtype=np.uint32)
        uniq, ids = np.unique(codes, return_inverse=True)
        self.chars = ''.join(map(chr, uniq))
        data = torch.from_numpy(ids.astype(np.int64))
        n = int(0.9 * len(data))
        self.train, self.val = data[:n], data[n:]

    @property
    def vocab_size(self):
        return len(self.chars)

    def decode(self, ids):
        return ''.join(self.chars[i] for i in ids)


@functools.lru_cache(maxsize=4)
def load_corpus(path):
    """Encoded once per process (encoding Tiny Shakespeare takes ~30 ms)."""
    return CharCorpus(path)


def corpus_path(dataset, directory=None):
    if dataset == 'shakespeare_char':
        return shakespeare_path(directory)
    if os.path.isfile(dataset):
        return os.path.abspath(dataset)
    raise DataError(f"unknown dataset {dataset!r}: give one of {', '.join(BUILTIN_TEXT + CLASSIFICATION)} "
                    f"or the path of an existing UTF-8 text file")


def eval_starts(n_chars, block_size, n_eval, seed, where='the validation split'):
    """n_eval distinct window starts (int64, in draw order) among the n_chars - block_size
    starts whose window of block_size + 1 characters fits, drawn without replacement by `seed`
    alone. Raises DataError when there are fewer than n_eval of them."""
    n_windows = n_chars - block_size
    if n_eval > n_windows:
        raise DataError(f"n_eval {n_eval} is more than the {n_windows:,} distinct evaluation windows of "
                        f"block_size {block_size} in {where} ({n_chars:,} characters); lower --n_eval "
                        f"to at most {n_windows} (or use a longer text or a smaller --block_size)")
    # numpy's choice without replacement samples a few of many starts without a full permutation
    return np.random.default_rng(seed).choice(n_windows, n_eval, replace=False).astype(np.int64)


class CharTask:
    """Next-character prediction on a text corpus. The reproducibility evaluation set is
    n_eval distinct windows of block_size from the validation split, picked by eval_seed
    alone (eval_starts), so every trial of a study sees exactly the same inputs."""
    kind = 'lm'

    def __init__(self, config, directory=None):
        self.corpus = load_corpus(corpus_path(config.dataset, directory))
        self.block_size = T = config.block_size
        for split, data in (('train', self.corpus.train), ('validation', self.corpus.val)):
            if len(data) < T + 2:
                raise DataError(f"{self.corpus.path}: the {split} split has {len(data)} characters, "
                                f"too few for block_size {T}; use a longer text or a smaller block_size")
        self.n_classes = self.corpus.vocab_size
        if config.vocab_size and config.vocab_size != self.n_classes:
            raise ValueError(f"vocab_size {config.vocab_size} does not match the data's "
                             f"{self.n_classes} characters (leave vocab_size at 0)")
        self.eval_indices = eval_starts(len(self.corpus.val), T, config.n_eval, config.eval_seed,
                                        where=f"the validation split of {self.corpus.path}")
        self.eval_x, self.eval_y = self._windows(self.corpus.val, torch.from_numpy(self.eval_indices))
        h = hashlib.sha256(f'lm:{self.corpus.sha256}:{T}:'.encode())
        h.update(self.eval_indices.tobytes())
        self.eval_hash = h.hexdigest()
        self.data_info = {'dataset': config.dataset, 'path': self.corpus.path,
                          'sha256': self.corpus.sha256, 'vocab_size': self.n_classes,
                          'train_tokens': len(self.corpus.train), 'val_tokens': len(self.corpus.val)}

    def _windows(self, data, starts):
        # one gather for the whole batch: no per-sample Python loop
        idx = starts[:, None] + torch.arange(self.block_size + 1)
        chunk = data[idx]
        return chunk[:, :-1], chunk[:, 1:]

    def config_updates(self):
        return {'vocab_size': self.n_classes}

    def train_batches(self, batch_size, generator, start=0):
        for _ in range(start):  # the skipped batches' draws, without building their windows
            self._starts(self.corpus.train, batch_size, generator)
        while True:  # random windows: there are no epochs in character LM training
            yield self.get_batch('train', batch_size, generator)

    def get_batch(self, split, batch_size, generator):
        data = self.corpus.train if split == 'train' else self.corpus.val
        return self._windows(data, self._starts(data, batch_size, generator))

    def _starts(self, data, batch_size, generator):
        # a window of block_size + 1 characters (inputs and their targets) fits at starts
        # 0 .. len - block_size - 1 inclusive: len - block_size of them
        return torch.randint(len(data) - self.block_size, (batch_size,), generator=generator)

    def tokens_per_batch(self, batch_size):
        return batch_size * self.block_size


def make_task(config, directory=None):
    """The Task for config.dataset: mnist / mnist1d classification (mnist.py), else text."""
    if task_kind(config.dataset) == 'classification':
        return ClassificationTask(config, directory)
    return CharTask(config, directory)


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='Download and verify Tiny Shakespeare.')
    parser.add_argument('--data-dir', default=None, help=f'default: ${DATA_DIR_ENV} or ./data')
    args = parser.parse_args()
    try:
        path = shakespeare_path(args.data_dir)
    except DataError as e:
        sys.exit(f"error: {e}")
    corpus = load_corpus(path)
    print(f"{path}: {os.path.getsize(path):,} bytes, sha256 ok, vocab {corpus.vocab_size}, "
          f"train {len(corpus.train):,} / val {len(corpus.val):,} characters")
