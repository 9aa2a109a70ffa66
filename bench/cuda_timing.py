"""Shared by the GPU micro-benchmarks (run as `python3 bench/<name>.py`, so this folder is on sys.path)."""
import json
import statistics
from pathlib import Path

import torch


def median_ms(fn, iters: int) -> float:
    """Median CUDA-event time of fn() in ms, after 3 untimed calls (compile, autotune, allocator growth)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def write_result(out: str | Path, name: str, result: dict) -> Path:
    """result as indented JSON in out/name (out is created), for the device tool to bring back; returns the path."""
    path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path


def peak_mib(fn) -> float:
    """Peak memory allocated during fn(), in MiB above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def print_table(rows: list[dict], keys: list[str]) -> None:
    """rows as aligned columns `keys` (floats to 3 decimals, small ones in e-notation); a row's "error" is appended
    to it."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}" if v == 0 or abs(v) >= 0.01 else f"{v:.2e}"
        return str(v)
    widths = [max(len(k), *(len(cell(r.get(k, ""))) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(cell(r.get(k, "")).ljust(w) for k, w in zip(keys, widths)) + (f"  ERROR {r['error']}"
                                                                                          if "error" in r else ""))
