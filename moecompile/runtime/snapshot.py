"""The in-memory level of PEC (the paper's snapshot): this rank's share of a checkpoint, copied into node-local
shared memory, where a restarted process of the same job finds it.

    <snapshot_dir>/moecompile-pec/<job>-<key>/rank<r>/slot<i>.bin    the tensors, each at a 64-byte offset (mmap)
                                                     /slot<i>.json   the commit marker: what the slot holds
    snapshot_dir  /dev/shm by default (memory that outlives a process, not the machine)
    job           torchrun's TORCHELASTIC_RUN_ID (kept by its restarts), `job_id=`, else local-<pid of rank 0>
    key           a digest of the checkpoint directory's absolute path

A snapshot holds this rank's share of one checkpoint: its non-expert keys and its experts of the K_snapshot
chosen per layer (runtime/checkpoint.py assigns each key to one rank). The persist (DCP's write to storage)
then reads the K_persist subset straight from the slot.

Invariants:
  - A marker is written (by rename) only after every byte of its slot is copied, and removed before the slot
    is written again: a slot without one is torn and never read.
  - A marker names the job, the checkpoint directory, the model's fingerprint, the step and the run (the
    checkpointer instance) of its checkpoint; inventory() ignores, with a warning, a slot naming another job,
    directory or model. restore() uses a slot only if its (step, run) is a committed checkpoint of the
    lineage it restores (runtime/recovery.py): a snapshot whose persist never finished is never used.
  - Three slots per rank (the triple buffer): the newest complete snapshot is the recovery buffer, the one
    before it the fallback (for a restore that finds the newest storage checkpoint damaged), and a checkpoint
    writes into the third, which is the persist buffer until its write commits. A checkpoint starts only
    after the previous one's persist (runtime/checkpoint.py), so no slot is ever written while it is being
    persisted or could be needed for recovery.
  - Size: at most 3 slots x (this rank's share of the non-expert state + its share of K_snapshot experts per
    layer), per rank and job. The space is reserved (posix_fallocate) before copying: a full file system fails
    there, with a warning and private buffers from then on, never with SIGBUS mid-copy. close() removes the
    rank's snapshots when the job ends; a job that crashes for good leaves at most that much behind, and
    local-<pid> jobs whose process is gone are removed by the next checkpointer on the node.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from moecompile.runtime.storage import ROOT

SLOTS = 3
FORMAT = 1
ALIGN = 64
_KIND = {"job": "job", "storage": "checkpoint directory", "fingerprint": "model"}


def storage_key(directory: Path) -> str:
    return hashlib.sha1(str(Path(directory).resolve()).encode()).hexdigest()[:12]


def default_job_id() -> str:
    return os.environ.get("TORCHELASTIC_RUN_ID") or f"local-{os.getpid()}"


class MemoryStore:
    """This rank's snapshots (see the module docstring). `stage()` copies a checkpoint into a slot on a thread
    of its own and gives the persist subset, read from the slot, to write to storage. `root=None`: private
    buffers, the same copy without recovery after a restart."""

    def __init__(self, root: Path | None, job: str, storage: Path, rank: int, fingerprint: dict):
        self.identity = {"job": job, "storage": str(Path(storage).resolve()),
                         "fingerprint": hashlib.sha1(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()}
        self.dir = None
        if root is not None:
            top = Path(root) / "moecompile-pec"
            _remove_dead_local_jobs(top)
            self.dir = top / f"{job}-{storage_key(storage)}" / f"rank{rank}"
            self.dir.mkdir(parents=True, exist_ok=True)
        self.steps: dict[int, int | None] = dict.fromkeys(range(SLOTS))  # slot → step of its complete snapshot
        self._flat: dict[int, torch.Tensor] = {}
        self._layouts: dict[tuple, tuple[dict, int]] = {}  # keys → (where each tensor goes, bytes)
        # one intra-op thread: a second multi-threaded parallel region beside training's oversubscribes the
        # cores (measured: +50% step time with a checkpoint every 10 steps on 2 cores, +10% with one thread)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pec-snapshot",
                                          initializer=torch.set_num_threads, initargs=(1,))
        self.pending = None  # the copy in flight: a Future of the state dict to persist

    # -- writing ---------------------------------------------------------------------------------------------

    def stage(self, state_dict: dict, persist: set[str], meta: dict) -> Future:
        """Start copying `state_dict` ({ROOT: {key: tensor or object}}) into a free slot; → a Future of the
        state dict to persist: the keys in `persist` read from the slot, and the objects. `meta`: the
        marker's content. Only the slot's choice and its reservation happen here, on the caller's time; the
        views and the copy on the snapshot thread."""
        inner = state_dict[ROOT]
        tensors = {k: v for k, v in inner.items() if torch.is_tensor(v)}
        slot = min(self.steps, key=lambda s: (self.steps[s] is not None, self.steps[s] or 0, s))
        self.steps[slot] = None
        layout, end = self._layout(tensors)
        flat = self._buffer(slot, end)
        marker = {**self.identity, **meta, "format": FORMAT, "entries": layout, "bytes": end}
        self.pending = self._thread.submit(self._copy, flat, tensors, inner, persist, slot, marker)
        return self.pending

    def _layout(self, tensors: dict) -> tuple[dict, int]:
        """Where each tensor goes in a slot ({key: [offset, dtype, shape]}) and the bytes it takes; the same
        for every checkpoint of the same keys (remembered: sequential selection cycles through a few)."""
        keys = tuple(tensors)
        if keys not in self._layouts:
            layout, end = {}, 0
            for key, t in tensors.items():
                start = -(-end // ALIGN) * ALIGN
                layout[key] = [start, str(t.dtype).removeprefix("torch."), list(t.shape)]
                end = start + t.nbytes
            self._layouts[keys] = layout, end
        return self._layouts[keys]

    def _copy(self, flat, tensors: dict, inner: dict, persist: set[str], slot: int, marker: dict) -> dict:
        views = {key: _view(flat, *where) for key, where in marker["entries"].items()}
        for key, t in tensors.items():
            views[key].copy_(t)
        if self.dir is not None:
            tmp = self.dir / f"slot{slot}.json.tmp"
            tmp.write_text(json.dumps(marker))
            os.replace(tmp, self.dir / f"slot{slot}.json")  # the commit: every byte is in place
        self.steps[slot] = marker["step"]
        return {ROOT: {k: views.get(k, v) for k, v in inner.items() if k in persist or not torch.is_tensor(v)}}

    def _buffer(self, slot: int, nbytes: int) -> torch.Tensor:
        """The slot's bytes, grown when too small; its marker is gone first (the slot is being rewritten)."""
        if self.dir is not None:
            (self.dir / f"slot{slot}.json").unlink(missing_ok=True)
        have = self._flat.pop(slot, None)  # a mapping of the old size must not outlive the truncation below
        if have is not None and have.numel() >= nbytes:
            self._flat[slot] = have
            return have
        if self.dir is not None:
            path = self.dir / f"slot{slot}.bin"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    os.ftruncate(fd, 0)
                    os.posix_fallocate(fd, 0, max(nbytes, 1))  # reserved now: no SIGBUS mid-copy when full
                finally:
                    os.close(fd)
                self._flat[slot] = torch.from_file(str(path), shared=True, size=max(nbytes, 1), dtype=torch.uint8)
                return self._flat[slot]
            except (OSError, RuntimeError) as err:  # no room: keep checkpointing, without memory recovery
                warnings.warn(f"PECCheckpointer: no room for the in-memory snapshot in {self.dir} ({err}); "
                              "restores read storage only from now on")
                self.release()
        self._flat[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return self._flat[slot]

    # -- reading ---------------------------------------------------------------------------------------------

    def inventory(self) -> list[dict]:
        """The complete snapshots of this job, directory and model on this rank: their markers, with `slot`.
        Others are ignored with a warning, torn ones (no marker) silently."""
        out = []
        for path in sorted(self.dir.glob("slot*.json")) if self.dir is not None else ():
            try:
                marker = json.loads(path.read_text())
                slot = int(path.stem[4:])
                data = self.dir / f"slot{slot}.bin"
                other = next((k for k, v in self.identity.items() if marker.get(k) != v), None)
                why = f"of another {_KIND[other]}: {marker.get(other)!r}, not {self.identity[other]!r}" if other else None
                if marker.get("format") != FORMAT:
                    why = f"format {marker.get('format')!r}"
                elif why is None and (not data.exists() or data.stat().st_size < marker["bytes"]):
                    why = "its data is shorter than its marker says"
            except (OSError, ValueError, KeyError) as err:
                why = str(err)
            if why is not None:
                warnings.warn(f"PECCheckpointer: ignoring the in-memory snapshot {path} ({why})")
                continue
            marker["slot"] = slot
            out.append(marker)
        return out

    def read(self, marker: dict, keys) -> dict[str, torch.Tensor]:
        """Copies of `keys` from a snapshot inventory() returned."""
        flat = torch.from_file(str(self.dir / f"slot{marker['slot']}.bin"), shared=False,
                               size=max(marker["bytes"], 1), dtype=torch.uint8)
        return {k: _view(flat, *marker["entries"][k]).clone() for k in keys}

    def retain(self, kept: dict[int, int]) -> None:
        """After a restore: keep the snapshots {slot: step} of the restored lineage, free the other slots."""
        for slot in range(SLOTS):
            self.steps[slot] = kept.get(slot)
            if slot not in kept and self.dir is not None:
                (self.dir / f"slot{slot}.json").unlink(missing_ok=True)

    def release(self) -> None:
        """Remove this rank's snapshots (the job ended, or shared memory is full), and the job's directory once
        no rank's is left."""
        self._flat.clear()
        if self.dir is None:
            return
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.dir.parent.rmdir()
        except OSError:
            pass  # another rank's snapshots are still there
        self.dir = None

    def close(self) -> None:
        self._thread.shutdown()


def _view(flat: torch.Tensor, start: int, dtype: str, shape: list[int]) -> torch.Tensor:
    dt = getattr(torch, dtype)
    n = dt.itemsize * (torch.Size(shape).numel())
    return flat[start:start + n].view(dt).view(shape)


def _remove_dead_local_jobs(top: Path) -> None:
    """Snapshots of local-<pid> jobs (no job id to restart under) whose process is gone: nobody can use them."""
    for job in top.glob("local-*"):
        pid = job.name.split("-")[1]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(job, ignore_errors=True)
        except (ValueError, PermissionError):
            pass
