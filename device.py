"""
Where a trial runs and what it records of it: the device, the autocast dtype, PyTorch's
determinism switches, provenance (git commit, versions, device, threads), and where a sweep's
trials run (layout: workers, threads, devices, Ray). The trainer, the plan and the sweep share
these; one home for each.
"""
import importlib.util
import os
import platform
import socket
import subprocess

import torch

from cli import RAY_INSTALL
from config import DTYPES
from fileio import PROJECT_DIR


def resolve_device(name):
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name not in ('cpu', 'cuda') and not name.startswith('cuda:'):
        raise ValueError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N")
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    return torch.device(name)


def autocast_dtype(dtype, device):
    """bfloat16 autocast on CUDA where supported (dtype 'auto'); float32 on CPU, where
    bfloat16 autocast was measured not to help. None means no autocast (float32)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    if dtype == 'auto':
        return torch.bfloat16 if device.type == 'cuda' and torch.cuda.is_bf16_supported() else None
    if dtype == 'float16' and device.type != 'cuda':
        raise ValueError("dtype float16 needs CUDA; use float32 or bfloat16 on CPU")
    return None if dtype == 'float32' else getattr(torch, dtype)


def dtype_name(amp_dtype):
    """The dtype a trial computes in, as recorded: 'float32', 'bfloat16' or 'float16'."""
    return str(amp_dtype or torch.float32).replace('torch.', '')


def cublas_workspace(deterministic):
    """cuBLAS reads CUBLAS_WORKSPACE_CONFIG once, when a process first uses it: set it before any
    CUDA work of a process that may run a deterministic trial (a sweep worker, train.py), not
    only when the trial starts."""
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')


def run_settings(opts, device, amp_dtype, threads=None):
    """How a trial runs, beyond its identity (the trainer's checkpoint records it; the plan
    compares it): a checkpoint continues bitwise only under the same. threads: default the
    torch thread count now in force."""
    return {'device': device.type, 'dtype': str(amp_dtype), 'compile': opts.compile,
            'deterministic': opts.deterministic, 'threads': threads or torch.get_num_threads()}


def set_determinism(deterministic, device):
    cublas_workspace(deterministic)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False
    if device.type == 'cuda':  # TF32 matmuls are fast but not bitwise reproducible
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic


def _git(*args):
    try:
        return subprocess.run(['git', *args], cwd=PROJECT_DIR, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ''


def provenance(device, deterministic):
    """What may legitimately differ between the trials of one group (threads, device,
    library versions): recorded, and warned about by the analysis when a group mixes them."""
    return {
        'git_commit': _git('rev-parse', 'HEAD') or None,
        'git_dirty': bool(_git('status', '--porcelain', '--untracked-files=no')),
        'torch_version': torch.__version__,
        'cuda_version': torch.version.cuda,
        'device': device.type,
        'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else (platform.processor() or platform.machine()),
        'threads': torch.get_num_threads(),
        'deterministic': deterministic,
        'python_version': platform.python_version(),
        'hostname': socket.gethostname(),
    }


# ----------------------------------------------------------------------------- where a sweep's trials run

def cores():
    """CPU cores this process may use ($OMP_NUM_THREADS if set)."""
    try:
        n = int(os.environ.get('OMP_NUM_THREADS', ''))
        if n > 0:
            return n
    except ValueError:
        pass
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def ray_layout(device, workers, threads, trials_per_gpu, ncpus, ngpus):
    if importlib.util.find_spec('ray') is None:
        raise ValueError(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL}")
    if trials_per_gpu is not None:
        raise ValueError("--trials-per-gpu is for local workers; with Ray use --ray-num-gpus (e.g. 0.5)")
    ncpus = 1.0 if ncpus is None else ncpus
    ngpus = 0.0 if ngpus is None else ngpus
    if ncpus < 0 or ngpus < 0 or ncpus + ngpus == 0:
        raise ValueError("--ray-num-cpus and --ray-num-gpus must be >= 0, not both 0")
    # the device is the task's, on whichever node runs it: not checked against this machine
    if device not in ('auto', 'cpu', 'cuda'):
        raise ValueError(f"--device {device} with Ray: use auto, cpu or cuda (Ray picks the GPU)")
    if device == 'cuda' and ngpus == 0:
        raise ValueError("--device cuda with Ray needs --ray-num-gpus > 0 (GPUs per trial)")
    if device == 'cpu' and ngpus > 0:
        raise ValueError("--ray-num-gpus > 0 reserves GPUs that --device cpu would not use")
    threads = threads or max(1, int(ncpus))
    execution = (f"Ray tasks ({ncpus:g} CPU, {ngpus:g} GPU, {threads} thread(s) per trial"
                 + (f", at most {workers} at once" if workers else '') + ')')
    return ['cuda' if ngpus > 0 else 'cpu'], workers, threads, {'num_cpus': ncpus, 'num_gpus': ngpus}, execution


def layout(executor, device, workers=None, threads=None, trials_per_gpu=None,
           ray_address=None, ray_num_cpus=None, ray_num_gpus=None, tiny_trials=False):
    """Where the trials run: (a device per worker slot, workers, threads per trial, Ray
    settings or None, a sentence saying it); ValueError for a combination that cannot run.
    tiny_trials: trials far too small for several threads (their OpenMP threads spend their
    time waiting on each other, worse on a busy machine): on CPU the defaults become one
    thread per trial and one worker per core."""
    ray_flags = [f for f, v in (('ray-address', ray_address), ('ray-num-cpus', ray_num_cpus),
                                ('ray-num-gpus', ray_num_gpus)) if v is not None]
    if executor == 'ray':
        devices, workers, threads, ray, execution = ray_layout(device, workers, threads, trials_per_gpu,
                                                               ray_num_cpus, ray_num_gpus)
        return devices, workers, threads, {**ray, 'address': ray_address}, execution
    if ray_flags:
        raise ValueError(f"{', '.join('--' + f for f in ray_flags)} go with --executor ray")
    dev = resolve_device(device)
    tiny = tiny_trials and dev.type == 'cpu'
    defaults = workers is None or threads is None  # what the execution line explains
    if dev.type == 'cuda':
        devices = [f'cuda:{i}' for i in range(torch.cuda.device_count())] if dev.index is None else [str(dev)]
        per_gpu = trials_per_gpu or 1
        workers = workers or len(devices) * per_gpu
        if workers > len(devices) * per_gpu:
            raise ValueError(f"--workers {workers} would put more than --trials-per-gpu {per_gpu} on one of "
                             f"the {len(devices)} device(s); raise --trials-per-gpu")
    else:
        if trials_per_gpu is not None:
            raise ValueError(f"--trials-per-gpu is for CUDA devices; this sweep runs on {dev}")
        devices, workers = ['cpu'], workers or (cores() if tiny else 1)
    threads = threads or (1 if tiny else max(1, cores() // workers))
    devices = [devices[i % len(devices)] for i in range(workers)]  # round-robin over the devices
    execution = (f"{workers} worker process(es)" if workers > 1 else "in this process") + \
        f" on {', '.join(sorted(set(devices)))}, {threads} thread(s) per trial"
    if tiny and defaults:
        execution += (" (tiny trials: one thread each, one worker per core, so no trial's threads wait "
                      "on each other; --workers / --threads override)")
    return devices, workers, threads, None, execution
