"""What every benchmark records beside its figures: when, on what machine, with what versions."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import sys
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """The machine a figure was measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = None
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": memory_gb, "platform": platform.platform()}


def versions(*packages: str) -> dict:
    """Installed versions of the given distributions (and Python)."""
    found = {"python": sys.version.split()[0]}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_result(name: str, figures: dict, packages: tuple[str, ...] = (), notes: str = "") -> Path:
    """Write bench/results/<name>.json with figures, date, machine and versions.

    `dates` holds the day each top-level figure was measured: today for every figure that
    differs from the file's earlier one, the earlier day for one a bench carried over
    unchanged (a run of part of a bench keeps the rest of its figures), so the README's
    table dates each figure, not the file's last write.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        earlier = {}
    earlier_figures, earlier_dates = earlier.get("figures", {}), earlier.get("dates", {})
    earlier_day = str(earlier.get("date", ""))[:10]
    dates = {
        key: earlier_dates.get(key, earlier_day) if key in earlier_figures and earlier_figures[key] == value else now[:10]
        for key, value in figures.items()
    }
    record = {
        "name": name,
        "date": now,
        "machine": machine(),
        "versions": versions(*packages),
        "figures": figures,
        "dates": dates,
        "notes": notes,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path
