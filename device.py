"""
Where a trial runs and what it records of it: the device, the autocast dtype, PyTorch's
determinism switches, and provenance (git commit, versions, device, threads). The trainer,
the plan and the sweep share these; one home for each.
"""
import os
import platform
import socket
import subprocess

import torch

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


def set_determinism(deterministic, device):
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')  # cuBLAS needs it
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
