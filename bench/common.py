"""Shared by the benchmark scripts: machine description, interleaved timing, results.json merging."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results.json"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # scripts run from anywhere import the project


def machine_info() -> dict[str, object]:
    """CPU model, cores, threads and library versions, for the record."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, object] = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "python": platform.python_version()}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin so that load from other
    processes on a shared machine hits every contender alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def merge_results(key: str, result: dict[str, Any], path: Path = RESULTS) -> None:
    """Write result under `key` of results.json, keeping the other benchmarks' keys."""
    existing = json.loads(path.read_text()) if path.exists() else {}
    existing[key] = {**result, "machine": machine_info(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(existing, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path} [{key!r}]")
