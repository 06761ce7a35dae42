"""
Files, shared by the trainer, the data and the analysis (standard library only: the
analysis and plotting side must not import torch):

    atomic_write, write_json,   results, reports and plots, never half-written
    write_text
    set_aside                   damaged results and refused checkpoints moved out of the
                                way (to <study>/damaged/<time>/), never deleted
    data_dir, fetch_verified    where data lives; a data file checked by its digest and
                                downloaded once if absent (both corpora: prepare_data, mnist)
    is_number                   a finite int or float (not a bool)
    DataError                   a missing, corrupt or unusable data file
    AnalysisError               result files the analysis cannot use at all (analyze_results,
                                ffn_report)
"""
import hashlib
import json
import math
import os
import tempfile
import time
import urllib.request

PROJECT_DIR = os.path.dirname(os.path.abspath(__file__))
DATA_DIR_ENV = 'REPRO_DATA_DIR'


def is_number(x):
    """A finite int or float (not a bool): what a metric must be to count."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class DataError(Exception):
    """A missing, corrupt or unusable data file; the message says what to do."""


class AnalysisError(ValueError):
    """Input the analysis cannot use at all; the message names the problem and the choices."""


# ----------------------------------------------------------------------------- writing

def atomic_write(path, write, check=None):
    """Write through `write(file)` to a hidden temp file beside `path` (.<name>XXXX.tmp),
    fsync it, let `check(temp_path)` raise if the content is wrong, then rename it over
    `path`: readers see the old file or the complete new one, never a half-written one.
    On any error (or Ctrl-C / SystemExit) the temp file is removed and `path` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path), suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; results are shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def json_ready(obj):
    """obj with every NaN or infinite float replaced by None, recursively (tuples become
    lists). The one rule for every JSON file this project writes: a non-finite number is
    no value (null), as a grad norm not measured at an eval point is, and the file stays
    strict JSON that any reader parses."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def write_json(path, obj):
    """obj as indented strict JSON (non-finite floats as null: json_ready), atomically."""
    text = json.dumps(json_ready(obj), indent=1, allow_nan=False) + '\n'
    atomic_write(path, lambda f: f.write(text.encode()))


def write_text(path, text):
    """text as UTF-8, atomically."""
    atomic_write(path, lambda f: f.write(text.encode('utf-8')))


def set_aside(paths, root):
    """Move the existing files of `paths` (each under folder `root`) to
    root/damaged/<local time>/<path relative to root>, never overwriting anything there
    (a taken name gets .1, .2, ...; a hidden name loses its leading dot so that it shows).
    Returns the new paths. Used for damaged trial results and refused checkpoints: they are
    kept for inspection, never deleted."""
    stamp = time.strftime('%Y%m%d-%H%M%S')
    moved = []
    for path in paths:
        if not os.path.exists(path):
            continue
        folder, name = os.path.split(os.path.relpath(path, root))
        dest = base = os.path.join(root, 'damaged', stamp, folder, name.lstrip('.'))
        n = 0
        while os.path.exists(dest):
            n += 1
            dest = f"{base}.{n}"
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.replace(path, dest)
        moved.append(dest)
    return moved


# ----------------------------------------------------------------------------- data files

def data_dir(path=None):
    """The data folder: `path`, else $REPRO_DATA_DIR, else ./data beside this project."""
    return path or os.environ.get(DATA_DIR_ENV) or os.path.join(PROJECT_DIR, 'data')


def file_digest(path, algorithm='sha256'):
    h = hashlib.new(algorithm)
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path):
    return file_digest(path, 'sha256')


def fetch_verified(directory, relpath, url, digest, algorithm='sha256', name=None, fetch=True, put=None):
    """Path of the data file <data dir>/<relpath> after checking its `algorithm` digest
    against `digest`, on every call. Absent, it is downloaded from `url` (when `fetch`),
    checked before it is renamed into place, so a wrong download never lands. A file on
    disk that does not match is reported, never replaced. `name` names the file in
    messages; `put` says what to put where when the download fails (default: this file
    at its path)."""
    path = os.path.join(data_dir(directory), relpath)
    name = name or relpath

    def check(p):
        got = file_digest(p, algorithm)
        if got != digest:
            raise DataError(f"{p}: {algorithm} {got} does not match {name}'s {digest}; the file is "
                            f"corrupt or another file (delete it to download again)")

    if os.path.exists(path):
        check(path)
        return path
    if not fetch:
        raise DataError(f"{name} not found at {path}")
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            data = r.read()
        atomic_write(path, lambda f: f.write(data), check)
    except OSError as e:  # offline, DNS, HTTP errors
        raise DataError(f"cannot download {url} ({e}); put {put or f'the file at {path}'} (or point "
                        f"--data-dir / ${DATA_DIR_ENV} at a folder holding {relpath})") from None
    return path
