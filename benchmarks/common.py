"""What every benchmark shares: the machine header its results are printed under (BENCHMARKS.md asks for it).

Scripts import it after putting ``benchmarks/`` on the path (``sys.path.insert(0, str(SHARED))``)."""

from __future__ import annotations

import os
import platform
from datetime import date

import torch


def machine() -> str:
    """``x86_64 (Intel Xeon …), 2 cores, torch 2.13.0 (2 threads)`` plus the GPU where one is used."""
    cpu = platform.processor() or platform.machine()
    text = f"{platform.machine()} ({cpu}), {os.cpu_count()} cores, torch {torch.__version__} "
    text += f"({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def machine_header() -> str:
    """``machine: …; date YYYY-MM-DD``: the first line of a benchmark's printed results."""
    return f"machine: {machine()}; date {date.today()}"
