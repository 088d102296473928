"""Shared helpers for the benchmarks: timing, machine info, rich tables and JSON results.

Kept generic (nothing MoE-specific) so every benchmark script reports the same way.
"""
from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# glibc hands large freed blocks back to the OS; the next step's fresh pages then fault on first touch.
# Measured here: ±20% step-time swings that depend on allocation order, not on the code under test.
# These keep large blocks on the heap (as a caching allocator would), for every implementation alike.
STABLE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def stable_malloc() -> None:
    """Re-run this script with STABLE_MALLOC set, unless it already is (glibc reads it at start-up)."""
    if sys.platform.startswith("linux") and any(os.environ.get(k) != v for k, v in STABLE_MALLOC.items()):
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **STABLE_MALLOC})


def time_round_robin(steps: dict[str, tuple[Callable[[], object], Callable[[], None] | None]], *,
                     warmup: int = 2, iters: int = 5) -> dict[str, float]:
    """Median wall time in ms of each named `step()`, measured in turns: one call of every step per round,
    so drift of a shared machine (other load, clock changes) reaches all of them alike. Each round takes
    the steps in a new order (shuffled, seeded): a call can run slower right after a particular other one
    (a 1-token MoE layer call ~10% slower right after Hugging Face's than after its own), and in a fixed
    order one step would always follow the same other.

    Each value is (step, reset); `reset()` runs before every call, outside the timed region.
    """
    samples: dict[str, list[float]] = {name: [] for name in steps}
    order, shuffle = list(steps), random.Random(0).shuffle
    for i in range(warmup + iters):
        shuffle(order)
        for name in order:
            step, reset = steps[name]
            if reset is not None:
                reset()
            t0 = time.perf_counter()
            step()
            if i >= warmup:
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def fwd_bwd_step(fn: Callable[[], torch.Tensor], cotangent: torch.Tensor) -> Callable[[], None]:
    """A step that runs `fn()` forward and backpropagates the fixed `cotangent` through it."""
    def step():
        out = fn()
        (out * cotangent).sum().backward()
    return step


def zero_grads(tensors: Iterable[torch.Tensor]) -> Callable[[], None]:
    """A reset callback that drops the `.grad` of every given tensor (parameters, leaf inputs)."""
    tensors = list(tensors)

    def reset():
        for t in tensors:
            t.grad = None
    return reset


def rel_err(a: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """max |a - ref| / max(max |ref|, floor); `floor` keeps a tensor that is zero up to rounding noise
    (e.g. a gradient that vanishes mathematically) from turning noise into a huge relative error."""
    a, ref = a.detach().double(), ref.detach().double()
    scale = max(ref.abs().max().item(), floor)
    diff = (a - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def progress(console: Console | None = None) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def table(title: str, columns: list[str], rows: list[list[str]], caption: str | None = None) -> Table:
    t = Table(title=title, caption=caption, caption_justify="left")
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i < 2 else "right")
    for row in rows:
        t.add_row(*row)
    return t


def write_json(path: Path | str, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"
