"""Run a function on N local gloo processes (CPU, spawned) and collect what each returns: for the tests, the
simulator's calibration (moecompile.sim) and the benchmarks; `free_port` for spawners with their own workers."""
import os
import socket
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_ranks(fn, world_size: int, *args, timeout_s: float = 240.0) -> list:
    """fn(rank, world_size, *args) on `world_size` processes; returns their results, rank order. A failure on
    any rank fails the caller with that rank's traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(fn, world_size, free_port(), tmp, timeout_s, args), nprocs=world_size,
                           join=True, start_method="spawn")
        return [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=False) for r in range(world_size)]


def _worker(rank, fn, world_size, port, tmp, timeout_s, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))  # a rank that fails must not hang the rest
    try:
        result = fn(rank, world_size, *args)
        dist.barrier()  # no rank tears its connections down while a peer still uses them (gloo aborts it)
    except BaseException:
        raise RuntimeError(f"rank {rank} failed:\n{traceback.format_exc()}") from None
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(tmp, f"{rank}.pt"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
