"""A training job for the fault-injection tests (tests/test_checkpoint_distributed.py), run by torchrun.

    torchrun --nproc-per-node 2 tests/pec_worker.py DIR OUT ATTEMPT STEPS EVERY K FAULT KSNAP SHM

Data-parallel training of a small GPT-MoE with PECCheckpointer(DIR, experts_per_ckpt=K,
experts_per_snapshot=KSNAP, snapshot_dir=SHM); the job id is torchrun's run id. FAULT:
    train:S   rank 1 SIGKILLs itself after step S, once the checkpoint before it is committed
    write:S   rank 1 tears its file of the checkpoint of step S and SIGKILLs itself mid-write (mid-persist)
    copy:S    rank 1 SIGKILLs itself halfway through copying its snapshot of the checkpoint of step S
    none
The test runs the job again after a fault, as `torchrun --max-restarts` would (a fresh launch each time:
torchrun's own restarts sometimes hang in gloo's reconnect on this machine). Writes to OUT, per attempt a
(ATTEMPT) and rank r: restored-a{a}-r{r}.pt (the step it resumed at, the state right after
restore(), the expert-version index, the restore report and the K of the checkpointer then),
saved-a{a}-s{step}-r{r}.pt (the whole state at each checkpoint).
"""
import dataclasses
import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import moecompile
from moecompile.models import gpt_moe
from moecompile.runtime.checkpoint import PECCheckpointer
from moecompile.runtime.snapshot import MemoryStore, _view


def batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    idx = torch.randint(0, 256, (2, 17), generator=g)
    return idx[:, :-1], idx[:, 1:]


def state(ckpt):
    return {e.key: e.get().detach().clone() for e in ckpt.state.entries()}


def tear_checkpoint_of(step: int):
    """Make rank 1 write half a file for the checkpoint of `step`, then die before DCP can finish it."""
    write_data = dcp.FileSystemWriter.write_data

    def torn(self, plan, planner):
        if f"step-{step:08d}" in str(self.path):
            (self.path / "__1_0.distcp").write_bytes(b"\0" * 100)
            os.kill(os.getpid(), signal.SIGKILL)
        return write_data(self, plan, planner)
    dcp.FileSystemWriter.write_data = torn


def kill_during_snapshot_of(step: int):
    """Make rank 1 copy half of its snapshot of the checkpoint of `step`, then die before its commit marker."""
    copy = MemoryStore._copy

    def torn(self, flat, tensors, inner, persist, slot, marker):
        if marker["step"] == step:
            for key, t in list(tensors.items())[:len(tensors) // 2]:
                _view(flat, *marker["entries"][key]).copy_(t)
            os.kill(os.getpid(), signal.SIGKILL)
        return copy(self, flat, tensors, inner, persist, slot, marker)
    MemoryStore._copy = torn


def main(directory, out, attempt, steps, every, k, fault, k_snapshot, shm):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    kind, _, at = fault.partition(":")
    if kind == "write" and rank == 1:
        tear_checkpoint_of(int(at))
    if kind == "copy" and rank == 1:
        kill_during_snapshot_of(int(at))
    torch.manual_seed(0)
    fast = moecompile.optimize(gpt_moe(n_layer=4, d_model=32, d_ff=64, n_head=2, max_seq=16), (batch(0, 0)[0],))
    opt = torch.optim.AdamW(fast.parameters(), lr=1e-2, weight_decay=0.1)
    ckpt = PECCheckpointer(fast, opt, directory, every=every, experts_per_ckpt=k, experts_per_snapshot=k_snapshot,
                           snapshot_dir=shm)
    start = ckpt.restore()
    report = dataclasses.asdict(ckpt.last_restore) if ckpt.last_restore else None
    torch.save({"start": start, "state": state(ckpt), "holders": ckpt.holders, "report": report,
                "k": (ckpt.k, ckpt.k_snapshot)}, os.path.join(out, f"restored-a{attempt}-r{rank}.pt"))
    for step in range(start, steps):
        x, y = batch(step, rank)
        fast(x, y)[1].backward()
        for p in fast.parameters():  # plain data parallel: every replica steps on the mean gradient
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
        opt.step()
        opt.zero_grad()
        if ckpt.step(step):
            torch.save(state(ckpt), os.path.join(out, f"saved-a{attempt}-s{step}-r{rank}.pt"))
        if kind == "train" and step == int(at):
            ckpt.wait()      # the newest checkpoint is committed (rank 0 renames it before its wait returns)
            dist.barrier()
            if rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)
    ckpt.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    d, o, attempt, steps, every, k, fault, k_snapshot, shm = sys.argv[1:]
    main(d, o, int(attempt), int(steps), int(every), int(k), fault, int(k_snapshot), shm)
