"""PECCheckpointer over several gloo processes: each byte written once and the writing balanced, restores after
a change of world size (data and expert parallel), and fault injection under torchrun (relaunched with the same
run id, as `--max-restarts` does): a rank SIGKILLed mid-training, mid-persist and mid-snapshot-copy, with its
node's memory kept or lost, and twice in a row (Dynamic-K); the job resumes from the newest complete versions,
bit-equal, with fewer lost tokens when memory survived.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
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
from moecompile.runtime.spawn import free_port, run_ranks
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


def torchrun(tmp_path, faults, steps=10, every=3, k=1, k_snapshot=None, between=None):
    """The job once per entry of `faults` (each attempt's fault, "none" for the last), each launch after a fault
    as `torchrun --max-restarts` would: the same run id, so the snapshots in memory are the job's.
    `between(attempt)` runs after each faulted attempt (a test deleting memory there). → (checkpoint
    directory, the workers' records, the snapshot root, the last launch's log)."""
    directory, out, shm = tmp_path / "ckpt", tmp_path / "out", tmp_path / "shm"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    job = f"pec-test-{uuid.uuid4().hex[:8]}"
    log = ""
    for attempt, fault in enumerate(faults):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{free_port()}", "--rdzv-id", job,
               str(ROOT / "tests" / "pec_worker.py"), str(directory), str(out), str(attempt), str(steps),
               str(every), str(k), fault, str(k_snapshot or k), str(shm)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            log = proc.communicate(timeout=240)[0]
        finally:
            if proc.poll() is None:  # torchrun and its workers, all of them
                os.killpg(proc.pid, signal.SIGKILL)
        assert (proc.returncode != 0) == (fault != "none"), log[-3000:]
        if fault != "none" and between is not None:
            between(attempt)
    return directory, out, shm, log


def restores(out):
    """The restores of the attempts that got past restore(), by attempt: {attempt: [rank 0's, rank 1's]}."""
    found = {}
    for path in out.glob("restored-a*-r*.pt"):
        attempt, rank = (int(part[1:]) for part in path.stem.split("-")[1:])
        found.setdefault(attempt, {})[rank] = torch.load(path, weights_only=False)
    return {a: [ranks[0], ranks[1]] for a, ranks in sorted(found.items()) if len(ranks) == 2}


def check_restored(out, attempt, resumed_at):
    """The restore of `attempt` resumed at `resumed_at`, every tensor bit-equal to the version its report says it
    restored: non-expert state from the checkpoint, each expert from the step of its version (in storage or in
    memory), as saved by the newest attempt that saved that step. → the two ranks' reports."""
    after = restores(out)[attempt]
    saved_states = {}  # path → the state saved there (each file once: there is a key per tensor below)
    for rank, restored in enumerate(after):
        assert restored["start"] == resumed_at
        report = restored["report"]
        assert report["step"] == resumed_at - 1
        older = 0
        for key, value in restored["state"].items():
            step = resumed_at - 1
            layer = next((l for l in restored["holders"] if key.startswith(f"model/{l}.experts.")
                          or key.startswith(f"optim/{l}.experts.")), None)
            if layer is not None:
                expert = int(key.split(f"{layer}.experts.")[1].split(".")[0])
                step = report["older_experts"].get(layer, {}).get(expert, step)
            older += step != resumed_at - 1
            saved = max(out.glob(f"saved-a*-s{step}-r{rank}.pt"), key=lambda p: int(p.stem.split("-")[1][1:]))
            if saved not in saved_states:
                saved_states[saved] = torch.load(saved)
            assert torch.equal(value, saved_states[saved][key]), (rank, key, step, saved.name)
        assert older > 0, "PEC with K=1: experts come from several checkpoints"
    assert after[0]["report"] == after[1]["report"], "every rank restored the same plan"
    return [r["report"] for r in after]


def _memory_experts(report):
    return sum(len(v) for v in report["from_memory"].values())


def test_sigkill_mid_snapshot_copy_then_mid_persist_keeps_older_complete_versions(tmp_path):
    """One job, two faults (one launch fewer than a job per fault). First, rank 1 is killed halfway through
    copying the snapshot of step 8: that snapshot has no commit marker on rank 1 and no checkpoint in
    storage, so the job resumes from step 5's checkpoint and snapshots, nothing torn read. Then, killed while
    writing the checkpoint of step 8 to storage: its snapshot is complete in memory but was never persisted,
    so the job again resumes from the checkpoint of step 5, with that checkpoint's snapshots: the ranks'
    memory was kept, so experts newer there than in storage come from memory, with fewer tokens lost than
    storage alone (a fault mid-training restores the same way: test_memory_lost_and_a_second_fault_double_k)."""
    directory, out, shm, log = torchrun(tmp_path, ["copy:8", "write:8", "none"], k=1, k_snapshot=4)
    after_copy = check_restored(out, 1, resumed_at=6)[0]
    assert _memory_experts(after_copy) > 0
    assert not (restores(out)[1][0]["state"].keys() ^ restores(out)[1][1]["state"].keys())
    after_write = check_restored(out, 2, resumed_at=6)[0]
    assert _memory_experts(after_write) > 0 and 0 < after_write["plt"] < after_write["plt_storage"], after_write
    assert not list(shm.rglob("slot*")), "the clean end removed the snapshots"
    assert (directory / "step-00000008").exists(), "the last launch wrote it again, whole"
    assert "did not finish" in log, "the half-written checkpoint was reported"
    assert not list(directory.glob(".tmp-*"))


def test_memory_lost_and_a_second_fault_double_k(tmp_path):
    """Fault 1 after step 6, rank 1's node memory lost: rank 1's share of the snapshots comes from storage, rank
    0's from its memory; Dynamic-K doubles K (1 -> 2) and the next checkpoints persist 2 experts per layer.
    Fault 2 after step 12, every node's memory lost: storage only, from K=2 (persisted; the job still asks
    for 1), doubled again."""
    def lose_memory(attempt):
        for rank_dir in shm.rglob("rank*"):
            if attempt == 1 or rank_dir.name == "rank1":
                shutil.rmtree(rank_dir)
    shm = tmp_path / "shm"
    directory, out, _, _ = torchrun(tmp_path, ["train:6", "train:12", "none"], steps=15, k=1, k_snapshot=4,
                                    between=lose_memory)
    first = check_restored(out, 1, resumed_at=6)[0]
    assert {w for v in first["from_memory"].values() for w in v.values()} == {0}, "rank 1 lost its memory"
    assert first["plt"] <= first["plt_storage"] and first["k_raised"] == (1, 2)
    second = check_restored(out, 2, resumed_at=12)[0]
    assert second["from_memory"] == {} and second["plt"] == second["plt_storage"]
    manifest = json.loads((directory / "step-00000011" / "pec.json").read_text())
    assert manifest["experts_per_ckpt"] == 2 and all(len(v) == 2 for v in manifest["saved"].values())
    assert second["k_raised"] == (2, 4) and restores(out)[2][0]["k"] == (4, 8)
    newest = json.loads((directory / "step-00000014" / "pec.json").read_text())
    assert newest["experts_per_ckpt"] == 4 and newest["dynamic_k"]["persist"] == 4
