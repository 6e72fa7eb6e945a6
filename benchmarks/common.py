"""What every benchmark shares: the machine header its results are printed under (BENCHMARKS.md asks for it).

Scripts import it after putting ``benchmarks/`` on the path (``sys.path.insert(0, str(SHARED))``)."""

from __future__ import annotations

import os
import platform
import resource
from datetime import date

import torch


def cpu_model() -> str:
    """The CPU's model name (Linux reports it in /proc/cpuinfo; elsewhere what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """``x86_64 (Intel Xeon …), 2 cores, torch 2.13.0 (2 threads)`` plus the GPU where one is used."""
    cpu = cpu_model()
    text = f"{platform.machine()} ({cpu}), {os.cpu_count()} cores, torch {torch.__version__} "
    text += f"({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def machine_header() -> str:
    """``machine: …; date YYYY-MM-DD``: the first line of a benchmark's printed results."""
    return f"machine: {machine()}; date {date.today()}"


def cpu_seconds() -> tuple[float, float]:
    """``(this process, its finished child processes)`` user + system CPU seconds so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def cpu_split(before: tuple[float, float]) -> tuple[float, float]:
    """Main-process and worker-process CPU seconds since ``before`` (a :func:`cpu_seconds`). The main process's
    share is what more workers cannot spread: ``(main + workers) / main`` bounds their speed-up (Amdahl)."""
    main_s, workers_s = (now - then for now, then in zip(cpu_seconds(), before, strict=True))
    return main_s, workers_s
