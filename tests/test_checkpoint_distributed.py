"""PECCheckpointer over several gloo processes: each byte written once and the writing balanced, restores after
a change of world size (data and expert parallel), and fault injection: a rank SIGKILLed mid-training and
mid-write under `torchrun --max-restarts`, the job resuming from the last complete checkpoint, bit-equal.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh

import moecompile
from moecompile.models import gpt_moe
from moecompile.runtime.checkpoint import PECCheckpointer
from moecompile.runtime.expert_parallel import reduce_gradients
from moecompile.runtime.spawn import run_ranks
from tests.pec_worker import batch, state

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(n_layer=4, d_model=32, d_ff=64, n_head=2, max_seq=16)


def _train_and_save(rank, ws, directory, k, ep):
    """A few data-parallel (ep=1) or expert-parallel (ep=ws) steps, one checkpoint at the end; → this rank's
    state then, and what the checkpointer planned."""
    torch.manual_seed(0)
    model = gpt_moe(**SMALL)
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("ep",)) if ep > 1 else None
    fast = moecompile.optimize(model, (batch(0, rank)[0],), mesh=mesh)
    opt = torch.optim.AdamW(fast.parameters(), lr=1e-2)
    ckpt = PECCheckpointer(fast, opt, directory, every=3, experts_per_ckpt=k)
    ckpt.restore()
    for step in range(6):
        x, y = batch(step, rank)
        fast(x, y)[1].backward()
        if mesh is not None:
            reduce_gradients(fast, mesh)
        else:
            for p in fast.parameters():
                dist.all_reduce(p.grad)
                p.grad /= ws
        opt.step()
        opt.zero_grad()
        ckpt.step(step)
    ckpt.close()
    dist.barrier()
    return {"state": state(ckpt), "bytes": ckpt.history[-1].bytes_per_rank, "experts": ckpt.history[-1].experts}


def _files(directory):
    return {p.name: p.stat().st_size for p in directory.glob("*.distcp")}


def _single_process_restore(directory):
    torch.manual_seed(7)
    fast = moecompile.optimize(gpt_moe(**SMALL), (batch(0, 0)[0],))
    ckpt = PECCheckpointer(fast, torch.optim.AdamW(fast.parameters(), lr=1e-2), directory)
    return ckpt, ckpt.restore()


@pytest.mark.parametrize("ws", [2, 4])
def test_data_parallel_writes_each_byte_once_balanced(tmp_path, ws):
    results = run_ranks(_train_and_save, ws, str(tmp_path), 1, 1)
    planned = results[0]["bytes"]
    assert all(r["bytes"] == planned for r in results), "every rank plans the same assignment"
    ckpt, start = _single_process_restore(tmp_path)  # world size ws → 1
    assert start == 6
    newest = tmp_path / "step-00000005"
    files = _files(newest)
    assert sorted(files) == [f"__{r}_0.distcp" for r in range(ws)], "every rank writes its share"
    # each key is stored once (DCP's metadata has one location per key) and nothing else is written
    meta = dcp.FileSystemReader(newest).read_metadata()
    chosen = results[0]["experts"]
    saved = [e for e in ckpt.state.entries() if e.layer is None or e.expert in chosen[e.layer]]
    assert sum(planned) == sum(e.get().nbytes for e in saved), "non-redundant: the state once, no more"
    payload = dict.fromkeys(files, 0)
    for index, where in meta.storage_data.items():
        item = meta.state_dict_metadata[index.fqn]
        if hasattr(item, "size"):  # a tensor (objects: the RNG states, optimizer settings)
            payload[where.relative_path] += item.size.numel() * item.properties.dtype.itemsize
    assert [payload[f"__{r}_0.distcp"] for r in range(ws)] == planned, "each rank wrote what it planned"
    assert max(planned) <= 1.25 * sum(planned) / ws, f"balanced: {planned}"
    got = state(ckpt)  # what this checkpoint saved, restored in one process: bit-equal
    assert all(torch.equal(got[e.key], results[0]["state"][e.key]) for e in saved)


def test_expert_parallel_checkpoint_restores_in_one_process(tmp_path):
    results = run_ranks(_train_and_save, 2, str(tmp_path), 8, 2)
    ckpt, start = _single_process_restore(tmp_path)
    assert start == 6
    got = state(ckpt)
    for r, result in enumerate(results):
        for key, value in result["state"].items():
            assert torch.equal(got[key], value), (r, key)
    assert set(got) == set(results[0]["state"]) | set(results[1]["state"])
    assert set(results[0]["state"]) != set(results[1]["state"]), "each rank held half the experts"


def _torchrun(tmp_path, fault, steps=10, every=3, k=1):
    """The job with `fault`, then launched again without, as `torchrun --max-restarts` would; → (checkpoint
    directory, the workers' records, the second launch's log)."""
    directory, out = tmp_path / "ckpt", tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    logs = []
    for attempt, this_fault in enumerate([fault, "none"]):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "tests" / "pec_worker.py"), str(directory), str(out), str(attempt), str(steps),
               str(every), str(k), this_fault]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            log = proc.communicate(timeout=180)[0]
        finally:
            if proc.poll() is None:  # torchrun and its workers, all of them
                os.killpg(proc.pid, signal.SIGKILL)
        assert (proc.returncode != 0) == (this_fault != "none"), log[-3000:]
        logs.append(log)
    return directory, out, logs[1]


def _restores(out):
    """The restores of the attempts that got past restore(), by attempt: {attempt: [rank 0's, rank 1's]}."""
    found = {}
    for path in out.glob("restored-a*-r*.pt"):
        attempt, rank = (int(part[1:]) for part in path.stem.split("-")[1:])
        found.setdefault(attempt, {})[rank] = torch.load(path, weights_only=False)
    return {a: [ranks[0], ranks[1]] for a, ranks in sorted(found.items()) if len(ranks) == 2}


def _check_resumed_exactly(out, resumed_at):
    """The first restore after the fault resumed at `resumed_at`, with every tensor bit-equal to the state saved
    then: non-expert state from that checkpoint, each expert from the checkpoint holding its newest version."""
    restores = _restores(out)
    assert restores[0][0]["start"] == 0 and len(restores) == 2
    after = restores[1]
    for rank, restored in enumerate(after):
        assert restored["start"] == resumed_at
        newest = torch.load(out / f"saved-a0-s{resumed_at - 1}-r{rank}.pt")
        older = 0
        for key, value in restored["state"].items():
            layer = next((l for l in restored["holders"] if key.startswith(f"model/{l}.experts.")
                          or key.startswith(f"optim/{l}.experts.")), None)
            step = resumed_at - 1
            if layer is not None:
                expert = int(key.split(f"{layer}.experts.")[1].split(".")[0])
                step = int(restored["holders"][layer][expert].split("-")[1])
            older += step != resumed_at - 1
            want = newest if step == resumed_at - 1 else torch.load(out / f"saved-a0-s{step}-r{rank}.pt")
            assert torch.equal(value, want[key]), (rank, key, step)
        assert older > 0, "PEC with K=1: experts come from several checkpoints"


def test_sigkill_mid_training_resumes_from_last_checkpoint(tmp_path):
    directory, out, _ = _torchrun(tmp_path, "train:6")  # checkpoints after steps 2 and 5, killed after 6
    _check_resumed_exactly(out, resumed_at=6)
    assert (directory / "step-00000008").exists(), "training went on to the end and checkpointed"


def test_sigkill_mid_write_keeps_the_previous_checkpoint(tmp_path):
    directory, out, log = _torchrun(tmp_path, "write:8")  # checkpoints after 2 and 5; 8's write is torn
    _check_resumed_exactly(out, resumed_at=6)
    assert (directory / "step-00000008").exists(), "the second launch wrote it again, whole"
    assert "did not finish" in log, "the half-written checkpoint was reported"
    assert not list(directory.glob(".tmp-*"))
