"""
Atomic file writes, shared by the trainer, the data download and the analysis (standard
library only: the analysis and plotting side must not import torch).
"""
import json
import os
import tempfile


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
