"""Run a function on N local gloo processes (CPU, spawned) and collect what each returns: for the tests, the
simulator's calibration (moecompile.sim), `moecompile viz --ranks` (viz/measure.py) and the benchmarks;
`free_port` for spawners with their own workers."""
import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankFailed(RuntimeError):
    """A spawned rank raised or died, or the ranks ran past their deadline; the message is the traceback of
    the rank that failed first (the others' errors, a peer's connection closed, follow from it)."""


def run_ranks(fn, world_size: int, *args, timeout_s: float = 240.0, deadline_s: float | None = None) -> list:
    """fn(rank, world_size, *args) on `world_size` processes, one thread each; returns their results, rank
    order. `timeout_s` bounds each collective (a rank that fails must not hang the rest), `deadline_s` the
    whole run (None: none). A failure on any rank raises RankFailed and ends the other ranks."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_worker, args=(fn, world_size, free_port(), tmp, timeout_s, args),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        try:
            while not ctx.join(timeout=1.0):  # raises once a rank failed, after ending the others
                if deadline is not None and time.monotonic() > deadline:
                    raise RankFailed(f"the {world_size} ranks did not finish within {deadline_s:.0f} s")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            raise RankFailed(_first_failure(tmp) or str(e).strip()) from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
                    p.join()
        return [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=False) for r in range(world_size)]


def _worker(rank, fn, world_size, port, tmp, timeout_s, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world_size, *args)
        dist.barrier()  # no rank tears its connections down while a peer still uses them (gloo aborts it)
    except BaseException:
        text = f"rank {rank} of {world_size} failed:\n{traceback.format_exc()}"
        with open(os.path.join(tmp, f"{rank}.err"), "w") as f:
            f.write(f"{time.monotonic()}\n{text}")
        raise RuntimeError(text) from None
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(tmp, f"{rank}.pt"))


def _first_failure(tmp: str) -> str | None:
    """The traceback of the rank that failed first (processes of one machine share the monotonic clock)."""
    failures = []
    for name in os.listdir(tmp):
        if name.endswith(".err"):
            with open(os.path.join(tmp, name)) as f:
                when, text = f.read().split("\n", 1)
            failures.append((float(when), text))
    return min(failures)[1] if failures else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
