"""What the benchmarks share: peak RSS of a variant's own process, printing a cProfile, and
running a variant in a fresh subprocess that reports one ``RESULT {json}`` line."""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any


def peak_rss_kb() -> int:
    """Peak RSS of this process, KiB.

    ``ru_maxrss`` survives exec on Linux: a child forked from a (large) parent starts with the
    parent's peak. VmHWM belongs to the current address space, so it is the child's own.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def print_pstats(profiler: cProfile.Profile, top: int, orders: tuple[str, ...] = ("tottime", "cumulative")) -> None:
    for order in orders:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(order).print_stats(top)
        text = out.getvalue()
        start = text.find("   ncalls")
        print(f"--- top {top} by {order} ---")
        print(text[start:].rstrip() + "\n", flush=True)


def run_variant(command: list[str], what: str, *, echo: bool = False) -> dict[str, Any]:
    """Run ``command`` (a benchmark in ``--variant`` mode) and return its RESULT; ``echo``
    prints its other stdout lines (a profile). A failure stops the benchmark, showing its stderr."""
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    result = None
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        elif echo:
            print(line)
    if result is None or completed.returncode != 0:
        sys.stderr.write(completed.stderr[-6000:])
        raise SystemExit(f"the {what} failed (exit code {completed.returncode}); its stderr is above")
    warnings = [line for line in completed.stderr.splitlines() if line.strip()]
    result["stderr_lines"] = len(warnings)
    if warnings:
        result["stderr_tail"] = warnings[-3:]
    return result
