"""What the benchmarks share: peak RSS of a variant's own process, printing a cProfile (and its
self time by area of the code), and running a variant in a fresh subprocess that reports one
``RESULT {json}`` line."""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import resource
import subprocess
import sys
from collections.abc import Sequence
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


IDLE = "idle: the event loop waiting (epoll)"
UNATTRIBUTED = "C calls from C (not attributed)"


def _area(filename: str, areas: Sequence[tuple[str, str]]) -> str | None:
    if filename == "~" or filename.startswith("<"):  # a C function or builtin: charge it to the caller
        return None
    for marker, area in areas:
        if marker in filename:
            return area
    return "other Python (stdlib, pydantic, ...)"


def self_time_by_area(profiler: cProfile.Profile, areas: Sequence[tuple[str, str]]) -> dict[str, float]:
    """Self time per area, ``areas`` being (substring of the file path, area) with the first match
    winning. A C function's time goes to the area of the Python code that called it (cProfile keeps
    the time per caller), so orjson.loads called by the pipeline counts as the pipeline's."""
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    found: dict[str, float] = {}
    for (filename, _line, name), (_cc, _nc, tottime, _ct, callers) in stats.items():
        if "select.epoll" in name:  # the event loop waiting for a socket or a timer: idle, not work
            found[IDLE] = found.get(IDLE, 0.0) + tottime
            continue
        area = _area(filename, areas)
        if area is not None:
            found[area] = found.get(area, 0.0) + tottime
            continue
        charged = 0.0
        for (caller_file, _l, _n), caller_stats in callers.items():
            share = caller_stats[2]  # tottime of this function under that caller
            caller_area = _area(caller_file, areas) or UNATTRIBUTED
            found[caller_area] = found.get(caller_area, 0.0) + share
            charged += share
        if tottime - charged > 1e-9:
            found[UNATTRIBUTED] = found.get(UNATTRIBUTED, 0.0) + tottime - charged
    return found


def print_areas(areas: dict[str, float], unit: str, count: int) -> None:
    """Self time per area, per ``unit`` (record, event) and in all."""
    total = sum(areas.values()) or 1.0
    print(f"--- self time by area (C functions charged to their Python caller), per {unit} ---")
    for area, seconds in sorted(areas.items(), key=lambda item: -item[1]):
        print(f"  {area:<58} {seconds / count * 1e6:>8.2f} us  {seconds:>7.2f} s  {100 * seconds / total:>5.1f} %")
    print(f"  {'all (profiling overhead included)':<58} {total / count * 1e6:>8.2f} us  {total:>7.2f} s\n")


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
