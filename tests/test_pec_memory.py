"""PEC's two levels and Dynamic-K in one process: what the snapshots in memory hold and where, that a restore
takes each expert's newest version from them bit-exactly with fewer lost tokens, that torn snapshots and those of
another job or model are never loaded, and that Dynamic-K doubles K after a lossy restore and keeps it.
The faults under torchrun (a rank SIGKILLed) are in tests/test_checkpoint_distributed.py.
"""
import errno
import json
import os
import shutil
import uuid
from pathlib import Path

import pytest
import torch

from moecompile.runtime.checkpoint import PECCheckpointer
from tests.test_checkpoint import _gpt, _manifest, _run, _state

LAYER = "blocks.1.ffn"


def _train(directory, steps, snaps=None, start=0, **kw):
    """Training that leaves its memory snapshots behind, as a killed job does (test_checkpoint._run)."""
    return _run(directory, steps, start=start, snaps=snaps, keep_snapshots=True, **kw)


def _restored(directory, **kw):
    fast, opt = _gpt(seed=123)  # other initial weights: everything must come from the checkpoints
    ckpt = PECCheckpointer(fast, opt, directory, **kw)
    return ckpt, ckpt.restore()


def _check_versions(ckpt, snaps, newest):
    """Every tensor equals the state saved at the step of the version the report says was restored."""
    report, got = ckpt.last_restore, _state(ckpt)
    for e in ckpt.state.entries():
        step = report.older_experts.get(e.layer, {}).get(e.expert, newest) if e.layer is not None else newest
        assert torch.equal(got[e.key], snaps[step][e.key]), (e.key, step)


def test_snapshots_in_shared_memory_restore_newer_experts(tmp_path):
    job = f"t-{uuid.uuid4().hex[:6]}"
    snaps = {}
    ckpt = _train(tmp_path, 11, snaps, experts_per_ckpt=1, experts_per_snapshot=4, job_id=job, dynamic_k=None)
    for h in ckpt.history[1:]:
        assert len(h.experts[LAYER]) == 1 and len(h.snapshot_experts[LAYER]) == 4
        assert set(h.experts[LAYER]) <= set(h.snapshot_experts[LAYER])
    memory = ckpt.memory.dir if ckpt.memory.dir else next(Path("/dev/shm/moecompile-pec").glob(f"{job}-*/rank0"))
    assert str(memory).startswith("/dev/shm/moecompile-pec/"), "node-local shared memory by default"
    markers = {json.loads(p.read_text())["step"] for p in memory.glob("slot*.json")}
    assert markers == {5, 7, 9}, "three slots: the newest snapshots"
    biggest = max(sum(h.snapshot_bytes_per_rank) for h in ckpt.history)
    entries = len(ckpt.state.entries())
    assert sum(p.stat().st_size for p in memory.glob("slot*.bin")) <= 3 * (biggest + 64 * entries), "bounded"

    restored, start = _restored(tmp_path, experts_per_ckpt=1, experts_per_snapshot=4, job_id=job, dynamic_k=None)
    assert start == 10
    report = restored.last_restore
    # storage holds 1 expert per layer from step 9, 1 from 7, 1 from 5 and 1 from 3; the snapshots of steps 9,
    # 7 and 5 (4 experts each, 3 beyond the persisted one on a round-robin of their own) hold every expert:
    # 6 per layer are newer there, and no expert is older than step 5
    assert all(len(v) == 6 and set(v.values()) == {0} for v in report.from_memory.values())
    assert all(step >= 5 for v in report.older_experts.values() for step in v.values())
    assert 0 < report.plt < report.plt_storage / 3
    _check_versions(restored, snaps, newest=9)
    restored.close()
    assert not list(Path("/dev/shm/moecompile-pec").glob(f"{job}-*")), "close() removed the job's snapshots"


def test_torn_and_foreign_snapshots_are_never_loaded(tmp_path):
    shm, snaps = tmp_path / "shm", {}
    _train(tmp_path / "ckpt", 11, snaps, experts_per_ckpt=1, experts_per_snapshot=4, snapshot_dir=shm, job_id="a",
           dynamic_k=None)
    job_dir = next((shm / "moecompile-pec").glob("a-*"))
    markers = {json.loads(p.read_text())["step"]: p for p in job_dir.glob("rank0/slot*.json")}
    markers[9].unlink()  # torn: the copy of step 9's snapshot never finished
    ckpt, _ = _restored(tmp_path / "ckpt", snapshot_dir=shm, job_id="a", dynamic_k=None)
    report = ckpt.last_restore
    assert report.from_memory, "step 7's snapshot is still newer than storage for some experts"
    assert all(report.older_experts[l][e] < 9 for l, v in report.from_memory.items() for e in v)
    _check_versions(ckpt, snaps, newest=9)
    ckpt.close(keep_snapshots=True)

    original = {step: markers[step].read_text() for step in (5, 7)}
    for step, text in original.items():
        markers[step].write_text(json.dumps({**json.loads(text), "fingerprint": "0" * 40}))
    with pytest.warns(UserWarning, match="another model"):
        ckpt, _ = _restored(tmp_path / "ckpt", snapshot_dir=shm, job_id="a", dynamic_k=None)
    assert ckpt.last_restore.from_memory == {} and ckpt.last_restore.plt == ckpt.last_restore.plt_storage
    ckpt.close(keep_snapshots=True)

    for step, text in original.items():
        markers[step].write_text(text)
    shutil.copytree(job_dir, job_dir.with_name("b" + job_dir.name[1:]))  # job a's snapshots where job b looks
    with pytest.warns(UserWarning, match="another job"):
        ckpt, _ = _restored(tmp_path / "ckpt", snapshot_dir=shm, job_id="b", dynamic_k=None)
    assert ckpt.last_restore.from_memory == {}
    ckpt.close()


def test_dynamic_k_doubles_k_after_a_lossy_restore_and_keeps_it(tmp_path):
    _train(tmp_path, 11, experts_per_ckpt=1, snapshot_dir=None)
    ckpt, start = _restored(tmp_path, every=2, experts_per_ckpt=1, snapshot_dir=None)
    report = ckpt.last_restore
    assert report.attributed_plt == report.plt_total > 0.0375 and report.k_raised == (1, 2)
    assert (ckpt.k, ckpt.k_snapshot) == (2, 2)
    ckpt.close()
    _train(tmp_path, 16, start=start, experts_per_ckpt=1, snapshot_dir=None)  # restore() adopts K=2
    newest = _manifest(tmp_path, "step-00000015")
    assert newest["experts_per_ckpt"] == 2 and all(len(v) == 2 for v in newest["saved"].values())
    # K persisted: the next restore starts from it; without Dynamic-K, K is what the job asks for
    ckpt, _ = _restored(tmp_path, experts_per_ckpt=1, snapshot_dir=None)
    assert (ckpt.last_restore.k_raised or (ckpt.k,))[0] == 2, "K starts from the persisted 2, not the job's 1"
    fixed, _ = _restored(tmp_path, experts_per_ckpt=1, snapshot_dir=None, dynamic_k=None)
    assert fixed.k == 1 and fixed.last_restore.k_raised is None


def test_no_room_in_shared_memory_means_private_buffers_and_storage(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.warns(UserWarning, match="no room for the in-memory snapshot"):
        _train(tmp_path / "ckpt", 4, experts_per_ckpt=1, experts_per_snapshot=4, snapshot_dir=tmp_path / "shm")
    assert not list((tmp_path / "shm").rglob("slot*")), "nothing half-reserved left behind"
    ckpt, start = _restored(tmp_path / "ckpt", snapshot_dir=tmp_path / "shm")
    assert start == 4 and ckpt.last_restore.from_memory == {}


def test_two_level_arguments():
    fast, opt = _gpt()
    for kw in ({"experts_per_ckpt": 2, "experts_per_snapshot": 1}, {"dynamic_k": 1.5}):
        with pytest.raises(ValueError):
            PECCheckpointer(fast, opt, "unused", **kw)
