"""
Atomic file writes, shared by the trainer, the data download and the analysis, and
set_aside, which moves damaged files out of the way without deleting them (standard
library only: the analysis and plotting side must not import torch).
"""
import json
import os
import tempfile
import time


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


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


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
