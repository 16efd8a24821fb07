"""Write a benchmark's figures to results/benchmarks/ with the command and machine that produced them.

A notebook that quotes a benchmark reads its file and asserts on it, so no figure is typed in by hand, and a reader
sees which machine, under what load, measured it.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import helpers

RESULTS = Path(__file__).resolve().parents[1] / "results" / "benchmarks"


def machine() -> dict:
    """Return the CPU model, cores, memory, load average and library versions of this machine."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory (GiB)": round(memory, 1) if memory else None,
            # Other programs' load changes every timing: the file says how busy the machine was.
            "load average (1, 5, 15 min) at the end": [round(x, 2) for x in os.getloadavg()],
            **{k: v for k, v in helpers.device_report().items() if k != "cpu threads"}}


def save_record(name: str, figures: dict, argv: list[str] | None = None) -> Path:
    """Write `figures` to results/benchmarks/<name>.json beside the command line, the machine and the date."""
    argv = sys.argv if argv is None else argv
    env = " ".join(f"{k}={os.environ[k]}" for k in ("TUTORIAL_MALLOC",) if k in os.environ)
    record = {"command": " ".join(filter(None, [env, "python", os.path.relpath(argv[0]), *argv[1:]])),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), **figures}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path.relative_to(RESULTS.parents[1])}")
    return path
