"""Partial Experts Checkpointing with moecompile: the reference GPT-MoE trained data-parallel on two ranks (gloo).

    torchrun --nproc-per-node 2 examples/checkpoint.py        # `make demo` runs it last

1. Training with `PECCheckpointer(experts_per_ckpt=1, experts_per_snapshot=4)`: each checkpoint copies the
   non-expert state and 4 of the 8 experts per MoE layer into shared memory (/dev/shm, where a restarted
   process finds them) and writes 1 of those 4 to storage (the first one saves all of them), the two ranks
   each taking half, in the background; the table shows the bytes and how long each checkpoint held
   training up.
2. A fault: both ranks drop their model, optimizer and checkpointer as a killed process would (the snapshots
   stay in shared memory), build new ones and `restore()`: non-expert state from the newest checkpoint in
   storage, each expert from its newest version, in memory or in storage. The portion of lost tokens (PLT) of
   what was restored is printed next to what storage alone would have lost, and training goes on from the
   step after that checkpoint with the same data as before: the replayed steps' losses, next to the first
   time round, show what the experts' older versions cost.
The training data is the standard library's own source code, bytes as tokens.
A rank SIGKILLed under torchrun and relaunched is what tests/test_checkpoint_distributed.py does.
"""
import shutil
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

import moecompile
from moecompile.models import gpt_moe
from moecompile.runtime import PECCheckpointer

CONFIG = dict(n_layer=4, d_model=128, d_ff=512, n_head=4, num_experts=8, top_k=2, max_seq=128)
BATCH, SEQ, EVERY, FAULT_AFTER, STEPS = 8, 128, 8, 45, 60
K_PERSIST, K_SNAPSHOT = 1, 4
MB = 1e6


def build(example):
    torch.manual_seed(0)  # the same weights on every rank
    fast = moecompile.optimize(gpt_moe(**CONFIG), (example,))
    return fast, torch.optim.AdamW(fast.parameters(), lr=1e-3, weight_decay=0.1)


def text() -> torch.Tensor:
    """The top-level modules of the standard library, as bytes (~5 MB, on every machine)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return torch.frombuffer(bytearray(b"".join(p.read_bytes() for p in sorted(root.glob("*.py")))),
                            dtype=torch.uint8).long()


def batch(data, step, rank):
    """Data as a function of the step: a resumed run replays the same batches."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    starts = torch.randint(0, data.numel() - SEQ - 1, (BATCH,), generator=gen)
    windows = torch.stack([data[s:s + SEQ + 1] for s in starts.tolist()])  # [BATCH, SEQ+1]
    return windows[:, :-1], windows[:, 1:]


def train_step(fast, opt, data, step, rank, world) -> float:
    x, y = batch(data, step, rank)
    loss = fast(x, y)[1]
    loss.backward()
    for p in fast.parameters():  # plain data parallel: every replica steps on the mean gradient
        dist.all_reduce(p.grad)
        p.grad /= world
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def main():
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    console = Console(width=130, quiet=rank != 0)
    directory = tempfile.mkdtemp(prefix="pec-demo-") if rank == 0 else None
    box = [directory]
    dist.broadcast_object_list(box)
    directory = box[0]
    console.print(f"[bold]Partial Experts Checkpointing: GPT-MoE ({CONFIG['n_layer']} blocks, MoE every other, "
                  f"{CONFIG['num_experts']} experts), {world} data-parallel ranks, a checkpoint every {EVERY} "
                  f"steps: {K_SNAPSHOT} experts per MoE layer into memory, {K_PERSIST} of them into {directory}[/]")
    data = text()
    fast, opt = build(batch(data, 0, rank)[0])

    def checkpointer(fast, opt):
        return PECCheckpointer(fast, opt, directory, every=EVERY, experts_per_ckpt=K_PERSIST,
                               experts_per_snapshot=K_SNAPSHOT)
    ckpt = checkpointer(fast, opt)
    step, times, losses = ckpt.restore(), [], {}  # losses: step → [first time, replayed]
    faulted = False
    while step < STEPS:
        began = time.perf_counter()
        losses.setdefault(step, []).append(train_step(fast, opt, data, step, rank, world))
        times.append(time.perf_counter() - began)
        ckpt.step(step)
        if step == FAULT_AFTER and not faulted:
            faulted = True
            history = ckpt.history
            ckpt.close(keep_snapshots=True)  # what a killed process leaves: its snapshots in shared memory
            console.print(f"\n[bold red]fault after step {step}[/]: model, optimizer and checkpointer thrown away "
                          f"on both ranks; the snapshots stay in {ckpt.memory.dir.parent if ckpt.memory.dir else '-'}")
            fast, opt = build(batch(data, 0, rank)[0])
            ckpt = checkpointer(fast, opt)
            step = ckpt.restore()
            r = ckpt.last_restore
            older = {layer: sorted(experts.items()) for layer, experts in r.older_experts.items()}
            memory = {layer: sorted(experts) for layer, experts in r.from_memory.items()}
            console.print(f"restored {r.directory}: training resumes at step {step}; experts from memory (newer than "
                          f"storage's): {memory}; versions older than the checkpoint (expert: step): {older}")
            console.print(f"[bold]portion of lost tokens: {r.plt:.2%} restored from memory and storage, "
                          f"{r.plt_storage:.2%} had it read storage alone[/]"
                          + (f"; Dynamic-K: K_persist {r.k_raised[0]} -> {r.k_raised[1]}, K_snapshot "
                             f"{r.experts_per_snapshot}" if r.k_raised else ""))
            continue
        step += 1
    ckpt.close()
    history += ckpt.history

    replayed = {s: v for s, v in losses.items() if len(v) == 2}
    console.print(f"\ntraining loss (rank {rank}'s batch, nats/byte): step 0 {losses[0][0]:.3f}, the replayed steps "
                  f"{min(replayed)}-{max(replayed)} first / after the restore: "
                  + ", ".join(f"{a:.3f}/{b:.3f}" for a, b in replayed.values())
                  + f"; last 5 steps' mean {statistics.fmean(losses[s][-1] for s in range(STEPS - 5, STEPS)):.3f}")
    step_s = statistics.median(times)
    table = Table(title=f"checkpoints of this run (rank {rank}'s view; a training step takes "
                        f"{step_s * 1e3:.0f} ms, median)")
    for col in ("after step", "experts persisted per layer", "memory MB per rank", "storage MB per rank",
                "blocked ms", "% of a step"):
        table.add_column(col)
    for h in history:
        experts = "all 8" if all(len(v) == 8 for v in h.experts.values()) else str(list(h.experts.values()))
        table.add_row(str(h.step), experts, " + ".join(f"{b / MB:.2f}" for b in h.snapshot_bytes_per_rank),
                      " + ".join(f"{b / MB:.2f}" for b in h.bytes_per_rank), f"{h.blocked_s * 1e3:.1f}",
                      f"{h.blocked_s / step_s:.1%}")
    console.print(table)
    full, partial = sum(history[0].bytes_per_rank), [sum(h.bytes_per_rank) for h in history[1:]]
    console.print(f"a PEC checkpoint is {statistics.median(partial) / full:.0%} of a full one; the busiest rank "
                  f"writes {max(max(h.bytes_per_rank) for h in history[1:]) / full:.0%} of a full checkpoint")
    dist.barrier()
    if rank == 0:
        shutil.rmtree(directory)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
