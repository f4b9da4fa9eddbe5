"""Peak memory of this process, as the benchmarks report it."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB: ``VmHWM`` of ``/proc/self/status`` on Linux.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries it over from the parent through fork and exec, so a
    child started by a parent that once held 3 GB reports 3 GB whatever it used itself. ``VmHWM`` belongs to the
    process's own address space, which exec replaces. Elsewhere ``ru_maxrss`` (kilobytes on Linux, bytes on macOS).
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0
