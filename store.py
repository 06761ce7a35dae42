"""
The trial store: the one owner of trial records on disk (the storage half of Optuna's
objective/storage split; train.py is the objective half and never decides what a file means).
No torch: the analysis reads results through it too.

    TrialKey                 (results dir, study, model, activation, trial) and its files
    trial_seeds, VARY_MODES  the three seeds of a trial under each --vary mode
    identity                 what a saved result must match to count as the trial
    load_trial               the one validator: a result that the analysis may use and a resume may skip
    state                    new / done / resumable / damaged / different, for trainer, plan and dry run alike
    save                     predictions, then the JSON that marks the trial done, then drop its checkpoint
    set_aside_damaged        a damaged trial's files kept under <study>/damaged/<time>/
    append_failure, read_failures, StudyLock, stray temp files

What "done" means, how resume works and what a damaged trial is: docs/trials-and-resume.md.
"""
import glob
import hashlib
import io
import json
import os
from dataclasses import dataclass

import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX: no lock between writers, and no harm either
    fcntl = None

from config import Config
from fileio import atomic_write, is_number, json_ready, set_aside, sha256_file, write_json

SCHEMA_VERSION = 1
VARY_MODES = ('all', 'init', 'data', 'dropout', 'none')
REQUIRED_METRICS = ('train_loss', 'val_loss', 'val_accuracy', 'training_time')
CKPT_META_VERSION = 1


class BadFile(Exception):
    """A result file that cannot be used; the message says why in a few words."""


# ----------------------------------------------------------------------------- keys and paths

@dataclass(frozen=True)
class TrialKey:
    """One trial of one study: <results_dir>/<study>/<model>/<activation>/trial_<trial>.json
    (+ .npz beside it, a hidden .trial_<k>.ckpt checkpoint while it trains). A grid design's
    cell is a study of its own, named <design>/<root>/<cell>."""
    results_dir: str
    study: str
    model: str
    activation: str
    trial: int

    @property
    def study_dir(self):
        return os.path.join(self.results_dir, self.study)

    @property
    def folder(self):
        return os.path.join(self.study_dir, self.model, self.activation)

    def path(self, ext):
        return os.path.join(self.folder, f'trial_{self.trial}.{ext}')

    @property
    def json(self):
        return self.path('json')

    @property
    def npz(self):
        return self.path('npz')

    @property
    def ckpt(self):
        """.trial_<k>.ckpt: hidden, so that nothing that globs trial_*.* mistakes it for a result."""
        return os.path.join(self.folder, f'.trial_{self.trial}.ckpt')

    @property
    def ckpt_meta(self):
        """What a dry run may know of the checkpoint without torch: its iteration and identity digest."""
        return self.ckpt + '.json'

    @property
    def name(self):
        cell = f" [{os.path.basename(self.study)}]" if '/' in self.study else ''  # a grid design's cell
        return f"{self.model}/{self.activation} trial {self.trial}{cell}"


# ----------------------------------------------------------------------------- identity

def trial_seeds(seed_base, trial, vary):
    """The three seeds of trial `trial`: those named by `vary` follow the trial, the rest
    stay at seed_base so that only the chosen source of randomness differs between trials."""
    if vary not in VARY_MODES:
        raise ValueError(f"unknown vary mode {vary!r}; valid: {', '.join(VARY_MODES)}")
    s = seed_base + trial
    return {'trial_seed': s,
            'init': s if vary in ('all', 'init') else seed_base,
            'data': s if vary in ('all', 'data') else seed_base,
            'dropout': s if vary in ('all', 'dropout') else seed_base}


# identity entries added after results were saved, at the value those results ran with
IDENTITY_DEFAULTS = {'compile': False}


def identity(task_kind, model, activation, trial, vary, config, dtype=None, deterministic=False, compile=False,
             eval_hash=None):
    """What a saved result must match to count as this trial: everything that determines its
    result. `config`: the run's Config with the data's fields filled in (Task.config_updates);
    dtype: the computation's ('float32', 'bfloat16', ...); eval_hash: the evaluation set's
    (prepare_data). None where not known yet (a dry run reads no data): not compared. What may
    differ inside a group (threads, device, library versions) is provenance, not identity:
    the analysis warns when a group mixes them (sanity.check_mixed_settings)."""
    return {'task': task_kind, 'model': model, 'activation': activation, 'trial': trial,
            'vary': vary, 'seeds': trial_seeds(config.seed_base, trial, vary), 'config': config.to_dict(),
            'dtype': dtype, 'deterministic': deterministic, 'compile': compile, 'eval_hash': eval_hash}


def differences(old, new):
    """'key: old -> new' for each identity entry that differs. A Config field added after the
    old result was saved is no difference while it is at its default; so is an identity entry
    added later (IDENTITY_DEFAULTS); an entry not known yet (None) is not compared."""
    out = []
    for key, value in new.items():
        if value is None:
            continue
        if key == 'config':
            old_cfg = old.get('config') or {}
            out += [f"{k}: {old_cfg.get(k)!r} -> {v!r}" for k, v in value.items() if old_cfg.get(k) != v
                    and (k in old_cfg or v != getattr(Config, k, None))]
        elif old.get(key, IDENTITY_DEFAULTS.get(key)) != value:
            out.append(f"{key}: {old.get(key)!r} -> {value!r}")
    return out


# ----------------------------------------------------------------------------- the validator

def _check_record(rec, where):
    if not isinstance(rec, dict):
        raise BadFile("not a JSON object")
    if rec.get('schema_version') != SCHEMA_VERSION:
        raise BadFile(f"schema_version {rec.get('schema_version')!r}, this tool reads {SCHEMA_VERSION}")
    if rec.get('source') != 'measured':
        raise BadFile(f"source is {rec.get('source')!r}, not 'measured'")
    says = (rec.get('model'), rec.get('activation'), str(rec.get('trial')))
    if says != where or not isinstance(rec.get('trial'), int):
        raise BadFile(f"says model/activation/trial {'/'.join(says)} but lies at {'/'.join(where)}")
    m = rec.get('metrics')
    bad = [k for k in REQUIRED_METRICS if not (isinstance(m, dict) and is_number(m.get(k)))]
    if bad:
        raise BadFile(f"metrics {', '.join(bad)} missing or not finite numbers")
    for key in ('eval_hash', 'predictions_file', 'predictions_sha256'):
        if not isinstance(rec.get(key), str) or not rec[key]:
            raise BadFile(f"no {key}")
    pf = rec['predictions_file']
    if os.path.basename(pf) != pf:
        raise BadFile(f"predictions_file {pf!r} is not a file name beside the JSON")


def _check_arrays(arrays, pf):
    probs = arrays['probs']
    if probs.ndim != 2 or probs.shape[0] == 0 or not np.issubdtype(probs.dtype, np.floating):
        raise BadFile(f"{pf}: probs should be a float array [n_eval, n_classes], got {probs.dtype} {probs.shape}")
    if not np.isfinite(probs).all() or (probs < 0).any() or not np.allclose(probs.sum(1, dtype=np.float64), 1, atol=1e-3):
        raise BadFile(f"{pf}: probs rows are not probability distributions")
    for k in ('eval_indices', 'targets'):
        if arrays[k].shape != (len(probs),):
            raise BadFile(f"{pf}: {k} has shape {arrays[k].shape}, expected ({len(probs)},)")
    routing = arrays.get('routing')
    if routing is not None and (routing.ndim < 2 or len(routing) != len(probs)
                                or not np.issubdtype(routing.dtype, np.integer) or (routing < 0).any()):
        raise BadFile(f"{pf}: routing should be non-negative expert indices [n_eval, layers, ...], "
                      f"got {routing.dtype} {routing.shape}")
    snaps = arrays.get('snapshot_probs')
    if snaps is not None:
        if snaps.ndim != 3 or snaps.shape[1:] != probs.shape or len(arrays.get('snapshot_iters', ())) != len(snaps):
            raise BadFile(f"{pf}: snapshot_probs should be [snapshots, {probs.shape[0]}, {probs.shape[1]}] with one "
                          f"snapshot_iters entry each, got {snaps.shape}")


def load_trial(json_path, where=None):
    """The trial saved at json_path as {'record', 'probs', 'eval_indices', 'targets', 'routing',
    'snapshot_probs', 'snapshot_iters', 'json_sha256'}, or BadFile saying why it cannot be used:
    the JSON parses, is a measured result of this schema, lies where it says it belongs
    (`where`: (model, activation, trial) as strings; default: from the path), has finite core
    metrics, and its .npz matches the sha256 the JSON records and holds probability rows."""
    if where is None:
        parts = os.path.normpath(json_path).split(os.sep)
        where = (parts[-3], parts[-2], parts[-1][len('trial_'):-len('.json')])
    try:
        with open(json_path, 'rb') as f:
            raw = f.read()
        rec = json.loads(raw)
    except (OSError, ValueError) as e:
        raise BadFile(f"unreadable JSON ({e})")
    _check_record(rec, where)
    pf = rec['predictions_file']
    try:
        with open(os.path.join(os.path.dirname(json_path), pf), 'rb') as f:
            npz = f.read()
    except FileNotFoundError:
        raise BadFile(f"{pf} is missing")
    except OSError as e:
        raise BadFile(f"{pf} is unreadable ({e.strerror})")
    if hashlib.sha256(npz).hexdigest() != rec['predictions_sha256']:
        raise BadFile(f"{pf} does not match predictions_sha256 (truncated or changed after the trial wrote it)")
    try:
        with np.load(io.BytesIO(npz), allow_pickle=False) as z:
            arrays = {k: z[k] for k in ('probs', 'eval_indices', 'targets')}
            for k in ('routing', 'snapshot_probs', 'snapshot_iters'):  # optional: MoE, snapshots
                arrays[k] = z[k] if k in z.files else None
    except Exception as e:  # noqa: BLE001 -- a corrupt archive fails in zipfile, zlib or numpy: unusable
        raise BadFile(f"{pf} cannot be loaded ({type(e).__name__}: {e})")
    _check_arrays(arrays, pf)
    return {'record': rec, **arrays, 'json_sha256': hashlib.sha256(raw).hexdigest()}


# ----------------------------------------------------------------------------- state

@dataclass(frozen=True)
class State:
    """kind: new | done | resumable | damaged | different; why: a few words for damaged and
    different; resume_at: the checkpoint's iteration (resumable)."""
    kind: str
    why: str = ''
    resume_at: int | None = None

    def __str__(self):
        return self.kind + (f" ({self.why})" if self.why else '') + (
            f" at iteration {self.resume_at}" if self.resume_at is not None else '')


def checkpoint_iteration(key, ident):
    """The iteration of the trial's checkpoint if its metadata says it belongs to `ident` (the
    trial's identity plus 'run', how it runs), else None. checkpoint.py checks the checkpoint
    itself when it loads it; this is what a dry run, which reads no data, can know."""
    try:
        with open(key.ckpt_meta) as f:
            meta = json.load(f)
        saved = meta['identity']
        if (os.path.exists(key.ckpt) and not differences(saved, {k: v for k, v in ident.items() if k != 'run'})
                and saved.get('run') == ident.get('run')):
            return int(meta['iter'])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def checkpoint_iteration_any(key):
    """The iteration its checkpoint's metadata records, whoever it belongs to; None without one."""
    try:
        with open(key.ckpt_meta) as f:
            return int(json.load(f)['iter']) if os.path.exists(key.ckpt) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def state(key, ident, run=None):
    """The state of a trial's files against its identity (and, for a checkpoint, how it runs:
    `run`, as checkpoint.py records it). One answer for the trainer, the preflight, the
    plan and the dry run."""
    if not os.path.exists(key.json):
        at = checkpoint_iteration(key, {**ident, 'run': run}) if run is not None else None
        return State('resumable', resume_at=at) if at is not None else State('new')
    try:
        saved = load_trial(key.json, (key.model, key.activation, str(key.trial)))
    except BadFile as e:
        return State('damaged', str(e))
    diffs = differences(saved['record'], ident)
    if diffs:
        return State('different', '; '.join(diffs))
    return State('done')


def saved_configs(study_dir):
    """(path, config dict) of every trial JSON saved in a study (its repeats too), unreadable
    ones skipped (the validator reports those where they matter)."""
    out = []
    for path in sorted(glob.glob(os.path.join(study_dir, '*', '*', 'trial_*.json'))
                       + glob.glob(os.path.join(study_dir, 'repeats', '*', '*', 'trial_*.json'))):
        try:
            with open(path) as f:
                cfg = json.load(f).get('config')
            if isinstance(cfg, dict):
                out.append((path, cfg))
        except (OSError, ValueError, AttributeError):
            continue
    return out


# ----------------------------------------------------------------------------- writing

def save(key, arrays, record):
    """Save a finished trial: its arrays (.npz), then the JSON that marks it done (with the
    .npz's name and sha256), then drop its checkpoint. Each file is written atomically."""
    atomic_write(key.npz, lambda f: np.savez(f, **arrays))
    record = json_ready({**record, 'predictions_file': os.path.basename(key.npz),
                         'predictions_sha256': sha256_file(key.npz)})
    write_json(key.json, record)
    discard_checkpoint(key)
    return record  # as saved: a non-finite number is None here too


def checkpoint_temp_files(key):
    """Temp files a killed write of the checkpoint left (fileio.atomic_write's names)."""
    folder, name = os.path.split(key.ckpt)
    return glob.glob(os.path.join(glob.escape(folder), glob.escape('.' + name) + '*.tmp'))


def discard_checkpoint(key):
    """Remove the trial's checkpoint, its metadata and temp files (done, or --force starts over)."""
    for p in [key.ckpt, key.ckpt_meta] + checkpoint_temp_files(key):
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def write_checkpoint_meta(key, it, ident):
    write_json(key.ckpt_meta, {'version': CKPT_META_VERSION, 'iter': it, 'identity': ident})


def set_aside_damaged(key, why):
    """Move a damaged trial's files to <study>/damaged/<time>/ (kept, not deleted); returns
    the one line that says so."""
    moved = set_aside([key.json, key.npz], key.study_dir)
    where = os.path.dirname(os.path.dirname(os.path.dirname(moved[0])))
    return (f"{os.path.relpath(key.json, key.study_dir)} is damaged ({why}): its files moved to {where}; "
            f"training it again")


def set_aside_checkpoint(key):
    """Move a refused checkpoint aside (kept for inspection); returns where it went."""
    kept = set_aside([key.ckpt], key.study_dir)
    for p in [key.ckpt_meta]:
        if os.path.exists(p):
            os.remove(p)
    return kept[0]


# ----------------------------------------------------------------------------- failures, lock, strays

def failure_log(study_dir):
    return os.path.join(study_dir, 'failures.jsonl')


def append_failure(study_dir, record):
    """Append one JSON line (non-finite numbers as null) to <study>/failures.jsonl with a
    single os.write, then fsync: a kill leaves either the whole line or none of it (a line
    cut short by an older crash gets a newline first)."""
    line = (json.dumps(json_ready(record), default=str, allow_nan=False) + '\n').encode()
    os.makedirs(study_dir, exist_ok=True)
    fd = os.open(failure_log(study_dir), os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b'\n':
            line = b'\n' + line
        while line:  # one write for any line of sane size; loop only on a short write
            line = line[os.write(fd, line):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_failures(study_dir, bad):
    """Records of <study>/failures.jsonl; unreadable lines go to `bad` as {'path', 'reason'}."""
    path = failure_log(study_dir)
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding='utf-8') as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        bad.append({'path': 'failures.jsonl', 'reason': f"unreadable ({e})"})
        return []
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            bad.append({'path': f'failures.jsonl line {n}', 'reason': f"unreadable ({e})"})
            continue
        out.append(rec)
    return out


def stray_temp_files(study_dir):
    """Temp files of fileio.atomic_write left by a killed run (.trial_<k>.<ext>XXXX.tmp; a
    half-written checkpoint: ..trial_<k>.ckptXXXX.tmp), at any depth below study_dir."""
    return sorted(glob.glob(os.path.join(study_dir, '**', '.*trial_*.tmp'), recursive=True))


def remove_stray_temp_files(study_dir):
    """Remove them; only while holding the study's lock (no writer of ours is writing them)."""
    strays = stray_temp_files(study_dir)
    for path in strays:
        os.remove(path)
    return len(strays)


class StudyLock:
    """<study>/.sweep.lock, held (flock) by every writer of a study (a sweep, train.py) while it
    runs; the kernel drops it when the process dies, however it dies."""

    def __init__(self, study_dir):
        self.path, self.fd = os.path.join(study_dir, '.sweep.lock'), None
        os.makedirs(study_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            self.fd = fd
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors='replace').strip() or '?'
            os.close(fd)
            raise ValueError(f"another run (pid {holder}) is writing to {study_dir}; wait for it "
                             f"or use another --study / --results-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
