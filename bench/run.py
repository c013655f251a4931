#!/usr/bin/env python3
"""Run every bench/bench_*.py (or the ones named), then rewrite bench/README.md's table.

Usage: python bench/run.py [NAME ...]   (NAME: labels, download, cache, model, ...)
Each script writes bench/results/<name>.json; the table is made from those files, so a
figure in the README always comes with the date and machine it was measured on.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
BEGIN, END = "<!-- results: begin -->", "<!-- results: end -->"


def _flatten(figures, prefix=""):
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not {"value"} <= set(value):
            yield from _flatten(value, name + ".")
        elif isinstance(value, dict):
            yield name, value["value"], value.get("unit", "")
        else:
            yield name, value, ""


def table() -> str:
    rows = ["| bench | figure | value | unit | date | machine |", "|---|---|---|---|---|---|"]
    for path in sorted((HERE / "results").glob("*.json")):
        record = json.loads(path.read_text())
        machine = record.get("machine", {})
        where = f"{machine.get('cores', '?')} cores" if isinstance(machine, dict) else str(machine)
        day, dates = str(record.get("date", ""))[:10], record.get("dates", {})
        for key, figure in record.get("figures", {}).items():
            date = dates.get(key, day)  # when this figure was measured (write_result)
            for name, value, unit in _flatten({key: figure}):
                if isinstance(value, float):
                    value = f"{value:.4g}"
                rows.append(f"| {record.get('name', path.stem)} | {name} | {value} | {unit} | {date} | {where} |")
    return "\n".join(rows)


def update_readme() -> None:
    text = README.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    README.write_text(text[:start] + "\n" + table() + "\n" + text[end:])


def main(argv=None) -> int:
    names = sys.argv[1:] if argv is None else argv
    scripts = sorted(HERE.glob("bench_*.py"))
    if names:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in names]
    failed = []
    for script in scripts:
        print(f"== {script.name}", flush=True)
        started = time.perf_counter()
        status = subprocess.call([sys.executable, str(script)], cwd=HERE.parent)
        print(f"== {script.name}: exit {status} in {time.perf_counter() - started:.0f} s", flush=True)
        if status:
            failed.append(script.name)
    update_readme()
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
