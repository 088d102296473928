"""PECCheckpointer: partial-experts checkpoints at two levels (memory, storage), sharded over ranks, restorable.

    ckpt = PECCheckpointer(fast_model, optimizer, "ckpts/", every=50, experts_per_ckpt=1, experts_per_snapshot=4)
    start = ckpt.restore()                 # next step to run: 0, or after the newest complete checkpoint
    for step in range(start, steps):
        ...train...
        ckpt.step(step)                    # every `every` steps: snapshot (memory), persist (storage, background)
    ckpt.close()                           # wait for the last write (before destroy_process_group)

One checkpoint, on every rank (runtime/pec.py says what it holds):
    wait for the previous checkpoint's persist          (so at most one is in flight)
    all-reduce the experts' token counts                → selection (load-aware) and the lost-token accounting
    pick K_snapshot experts per layer and, among them, K_persist; assign every key to one rank holding it
        (balanced bytes, none written twice: persisted keys first, then the snapshot-only experts)
    copy this rank's keys into a slot in shared memory (runtime/snapshot.py's MemoryStore), on a thread, during
        the next forward and backward; the next optimizer step waits until they are (with the planning, the
        only parts training waits for); then the slot's commit marker; then, on another thread, dcp.save of the
        K_persist subset from the slot, on a gloo group of its own
    background, rank 0: DCP's `.metadata` is in place → write pec.json (the manifest) → rename
        `.tmp-<step>-<run>/` to `step-<step>/` (the commit) → index.json → delete checkpoints no restore needs

A directory is a checkpoint once renamed; a crash before that leaves a `.tmp-*` directory that restore()
reports and removes, and never touches the committed ones. Each manifest records, for every expert, the
checkpoint holding its newest version and the token counts at its save: the index restore() plans from
(runtime/recovery.py), with the snapshots in memory that are newer (runtime/snapshot.py).
"""
from __future__ import annotations

import copy
import io
import os
import pickle
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from moecompile.runtime import pec, storage
from moecompile.runtime.recovery import PLTExceeded, Restoring, RestoreReport, rng_state
from moecompile.runtime.snapshot import MemoryStore, default_job_id

__all__ = ["PECCheckpointer", "PLTExceeded", "RestoreReport", "SaveStats"]
LINEAGE = 8  # checkpoints of the lineage a manifest names (more than the snapshots a rank keeps)


@dataclass
class SaveStats:
    step: int
    experts: dict[str, list[int]]  # layer → experts persisted
    bytes_per_rank: list[int]      # planned tensor bytes each rank persists
    wait_s: float                  # blocked waiting for the previous checkpoint's write
    snapshot_s: float              # blocked planning this checkpoint and starting its in-memory copy
    copy_wait_s: float = 0.0       # blocked at the next optimizer step until that copy had finished
    snapshot_experts: dict[str, list[int]] | None = None  # layer → experts snapshotted (a superset)
    snapshot_bytes_per_rank: list[int] | None = None      # planned tensor bytes each rank copies to memory

    @property
    def blocked_s(self) -> float:
        """All the time training waited for this checkpoint."""
        return self.wait_s + self.snapshot_s + self.copy_wait_s


class PECCheckpointer(Restoring):
    """Partial Experts Checkpointing for a model returned by moecompile.optimize() (see the module docstring).

    experts_per_ckpt: K_persist, experts written to storage per MoE layer per checkpoint (>= E: full).
    experts_per_snapshot: K_snapshot >= K_persist, experts copied to memory per checkpoint (default K_persist);
        restore() takes an expert from memory when that version is newer than storage's.
    selection: "sequential" (round-robin) or "load_aware" (most tokens since their last save first).
    keep: how many of the newest checkpoints stay restorable (with every expert version they need); 2 lets a
        restore fall back to the previous checkpoint when the newest is damaged.
    max_plt: restore() raises PLTExceeded when the cumulative portion of lost tokens would exceed it.
    dynamic_k: after a restore, when the portion of lost tokens since K was last set exceeds it, K_persist and
        K_snapshot double (up to E) and stay doubled in later checkpoints (None: K stays).
    stateful: more state to save per rank, {name: object with state_dict()/load_state_dict()} (an LR
        scheduler, a data loader); the RNG states (torch, CUDA, Python, NumPy) are always saved per rank.
    snapshot_dir: node-local memory for the snapshots (None: process memory, no recovery from memory after
        a restart).
    job_id: the job the snapshots belong to (default: torchrun's run id, which its restarts keep).
    Under torch.distributed every rank constructs it and calls step() and restore() (they are collective); a
    key's value must be the same on every rank holding it (data- and expert-parallel replicas are).
    """

    def __init__(self, model, optimizer, directory, every: int = 50, experts_per_ckpt: int = 1,
                 experts_per_snapshot: int | None = None, selection: str = "sequential", keep: int = 2,
                 max_plt: float | None = None, dynamic_k: float | None = 0.0375, stateful: dict | None = None,
                 snapshot_dir: str | None = "/dev/shm", job_id: str | None = None):
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"PECCheckpointer: every={every!r}; expected a number of steps >= 1")
        if not (isinstance(experts_per_ckpt, int) and experts_per_ckpt >= 1):
            raise ValueError(f"PECCheckpointer: experts_per_ckpt={experts_per_ckpt!r}; expected an integer >= 1")
        snap = experts_per_ckpt if experts_per_snapshot is None else experts_per_snapshot
        if not (isinstance(snap, int) and snap >= experts_per_ckpt):
            raise ValueError(f"PECCheckpointer: experts_per_snapshot={experts_per_snapshot!r}; expected an integer "
                             f">= experts_per_ckpt ({experts_per_ckpt}): the persisted experts come from the snapshot")
        if selection not in pec.SELECTIONS:
            raise ValueError(f"PECCheckpointer: selection={selection!r}; expected one of {', '.join(pec.SELECTIONS)}")
        if keep < 1:
            raise ValueError(f"PECCheckpointer: keep={keep!r}; expected >= 1")
        if dynamic_k is not None and not 0 < dynamic_k < 1:
            raise ValueError(f"PECCheckpointer: dynamic_k={dynamic_k!r}; expected a portion in (0, 1), or None")
        self.state = pec.StateMap.of(model, optimizer)
        if not self.state.layers:
            warnings.warn("PECCheckpointer: the model has no MoE layer moecompile rewrote; every checkpoint is full")
        self.model, self.optimizer, self.directory = model, optimizer, Path(directory)
        self.every, self.k, self.k_snapshot, self.selection = every, experts_per_ckpt, snap, selection
        self.keep, self.max_plt, self.dynamic_k = keep, max_plt, dynamic_k
        self.stateful = dict(stateful or {})
        self.distributed = dist.is_available() and dist.is_initialized()
        if not self.distributed:  # DCP warns at every single-process save (in our background thread)
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        # background writes synchronize on their own group, never interleaving with training's collectives
        self.group = dist.new_group(backend="gloo") if self.distributed else None
        self.local = self._gather({layer: (r.start, r.stop) for layer, r in self.state.local.items()})
        self.run_id, job = self._broadcast((uuid.uuid4().hex[:8], job_id or default_job_id()))
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.fingerprint = self.state.fingerprint()
        self.memory = MemoryStore(_memory_root(snapshot_dir), job, self.directory, self.rank, self.fingerprint)
        options = getattr(getattr(model, "_moecompile", None), "options", None)
        self.layout = {"shortcut": getattr(options, "shortcut", None),
                       "parallelism": getattr(options, "parallelism", "ep")}
        E = self.state.layers
        self._specs = {m.name: m.spec for m in _moe_layers(model)}
        for layer, spec in self._specs.items():
            spec.expert_load = torch.zeros(E[layer], dtype=torch.int64, device=_device(model))
        self.counter = 0                                                      # checkpoints taken in this lineage
        self.cumulative = {l: [0] * n for l, n in E.items()}                  # assignments since the first step
        self.holders: dict[str, list[str | None]] = {l: [None] * n for l, n in E.items()}  # newest version's dir
        self.saved_at = {l: [[0, -1] for _ in range(n)] for l, n in E.items()}  # per expert [cumulative, counter]
        self.lost: dict[str, int] = {}
        self.lost_at_k: dict[str, int] = {}    # lost assignments when K was last set (Dynamic-K)
        self.lineage: list[list] = []          # [step, run] of this lineage's newest checkpoints
        self.history: list[SaveStats] = []
        self.last_restore: RestoreReport | None = None
        self._restored = False
        self._inventory: list[dict] = []
        self._jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pec-commit")
        self._pending = None
        self._memo: dict = {}
        self._hook = optimizer.register_step_pre_hook(self._await_snapshot) if optimizer is not None else None
        self._param_names = {id(p): n for n, p in model.named_parameters()}

    # -- saving ----------------------------------------------------------------------------------------------

    def step(self, step: int) -> bool:
        """Call after each optimizer step; checkpoints after every `every`-th. Returns whether it did."""
        if (step + 1) % self.every:
            return False
        self.save(step)
        return True

    def save(self, step: int) -> SaveStats:
        """Checkpoint now, as of the end of `step`: blocks for the in-memory snapshot, persists in the background."""
        began = time.perf_counter()
        self.wait()
        waited = time.perf_counter()
        if not self._restored:
            self._refuse_foreign_directory()
        self._count_tokens()
        persist, snapshot = self._choose()
        name = f"step-{step:08d}"
        writes, persist_keys, bytes_per_rank, snapshot_bytes = self._writes(persist, snapshot)
        # buffers (running statistics) may change in the next forward: copied now; parameters and optimizer
        # state change only at the next optimizer step, which waits for the background copy
        mine = {e.key: e.get().clone() if e.buffer else e.get() for e in writes}
        units: dict[str, dict] = {}
        for e in writes:
            if e.layer is not None:
                unit = units.setdefault(e.layer, {}).setdefault(str(e.expert), {
                    "count": self.cumulative[e.layer][e.expert], "keys": []})
                unit["keys"].append(e.key)
        mine.update(self._objects())
        for layer, experts in persist.items():
            for e in experts:
                self.holders[layer][e] = name
                self.saved_at[layer][e] = [self.cumulative[layer][e], self.counter]
        self.lineage = (self.lineage + [[step, self.run_id]])[-LINEAGE:]
        manifest = {"format": storage.FORMAT, "step": step, "counter": self.counter, "selection": self.selection,
                    "experts_per_ckpt": self.k, "experts_per_snapshot": self.k_snapshot, "saved": persist,
                    "snapshot": snapshot, "holders": copy.deepcopy(self.holders),
                    "saved_at": copy.deepcopy(self.saved_at), "cumulative": copy.deepcopy(self.cumulative),
                    "lost": dict(self.lost), "bytes_per_rank": bytes_per_rank, "world_size": self.world,
                    "lineage": self.lineage, "layout": self.layout, "fingerprint": self.fingerprint,
                    "dynamic_k": {"persist": self.k, "snapshot": self.k_snapshot, "lost_at_k": dict(self.lost_at_k)}}
        tmp = self.directory / f".tmp-{name}-{self.run_id}"
        # the copy into memory runs on the snapshot thread, the write to storage after it on the commit thread
        staged = self.memory.stage({storage.ROOT: mine}, persist_keys,
                                   {"step": step, "run": self.run_id, "rank": self.rank, "experts": units})
        self._pending = (name, self._jobs.submit(self._persist, staged, tmp, name, manifest))
        self.counter += 1
        stats = SaveStats(step, persist, bytes_per_rank, waited - began, time.perf_counter() - waited,
                          snapshot_experts=snapshot, snapshot_bytes_per_rank=snapshot_bytes)
        self.history.append(stats)
        return stats

    def wait(self) -> None:
        """Block until the checkpoint being written is committed; raises if its write failed."""
        self._await_snapshot()
        if self._pending is not None:
            (name, pending), self._pending = self._pending, None
            try:
                pending.result()
            except BaseException as err:  # DCP's CheckpointException is a BaseException
                # its experts have no version on disk now: the next checkpoint saves them again
                for holders in self.holders.values():
                    holders[:] = [None if h == name else h for h in holders]
                if isinstance(err, (KeyboardInterrupt, SystemExit)):
                    raise
                raise RuntimeError(f"PECCheckpointer: writing {name} failed; the previous checkpoints are "
                                   f"intact, and the next checkpoint saves its experts again: {err}") from err

    def close(self, keep_snapshots: bool = False) -> None:
        """Wait for the last write (raising if it failed) and remove this rank's snapshots from memory; call
        before destroy_process_group(). `keep_snapshots=True` leaves them for a restore by another process or
        checkpointer of the same job (a process handing over, a simulated fault)."""
        try:
            self.wait()
        finally:  # released even when the last write failed
            self._jobs.shutdown()
            self.memory.close()
            if not keep_snapshots:
                self.memory.release()
            if self._hook is not None:
                self._hook.remove()
            for spec in self._specs.values():
                spec.expert_load = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _await_snapshot(self, *_) -> None:
        """The optimizer's step pre-hook: the step may change what the snapshot is still copying."""
        if self.memory.pending is not None:
            began = time.perf_counter()
            self.memory.pending.result()
            self.memory.pending = None
            self.history[-1].copy_wait_s += time.perf_counter() - began

    def _count_tokens(self) -> None:
        if not self._specs:
            return
        counts = torch.stack([spec.expert_load for spec in self._specs.values()]).cpu()   # [L, E]
        for spec in self._specs.values():
            spec.expert_load.zero_()
        if self.distributed:
            dist.all_reduce(counts)
        for layer, row in zip(self._specs, counts.tolist()):
            self.cumulative[layer] = [c + n for c, n in zip(self.cumulative[layer], row)]

    def _choose(self) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        """(experts to persist, experts to snapshot) per layer; the second contains the first."""
        E = self.state.layers
        if any(h is None for hs in self.holders.values() for h in hs):
            every = {l: list(range(n)) for l, n in E.items()}  # every expert needs a saved version first
            return every, every
        if self.selection == "sequential":
            return (pec.sequential(self.counter, E, self.k),
                    pec.sequential_snapshot(self.counter, E, self.k, self.k_snapshot))
        unsaved = {l: [c - s[0] for c, s in zip(self.cumulative[l], self.saved_at[l])] for l in E}
        age = {l: [s[1] for s in self.saved_at[l]] for l in E}
        return pec.load_aware(unsaved, age, self.k), pec.load_aware(unsaved, age, self.k_snapshot)

    def _writes(self, persist, snapshot) -> tuple[list, set[str], list[int], list[int]]:
        """(the entries this rank snapshots, the keys of those it persists, bytes each rank persists, bytes each
        rank snapshots) for one choice; remembered per choice (sequential selection cycles through a few)."""
        entries = self.state.entries()
        if self._memo.get("entries") is not entries:
            self._memo = {"entries": entries}
        key = (tuple(tuple(v) for v in persist.values()), tuple(tuple(v) for v in snapshot.values()))
        if key not in self._memo:
            writers, per_rank = self._assign(entries, persist, [0] * self.world, non_expert=True)
            extra = {l: [e for e in experts if e not in persist[l]] for l, experts in snapshot.items()}
            snap_writers, snap_per_rank = self._assign(entries, extra, list(per_rank), non_expert=False)
            mine = [e for e in entries if self.rank in (writers.get(_unit(e)), snap_writers.get(_unit(e)))]
            persisted = {e.key for e in entries if writers.get(_unit(e)) == self.rank}
            self._memo[key] = mine, persisted, per_rank, snap_per_rank
        return self._memo[key]

    def _assign(self, entries, chosen, load: list[int], non_expert: bool) -> tuple[dict, list[int]]:
        """Writer rank of every unit (a non-expert key if `non_expert`, or one chosen expert), computed alike on
        every rank, balancing bytes on top of `load`; → (writers, bytes per rank including `load`)."""
        sizes, holders = {}, {}
        for e in entries:
            if e.layer is None and non_expert:
                sizes[e.key] = sizes.get(e.key, 0) + e.nbytes
        for layer, experts in chosen.items():  # experts held elsewhere: sized like one held here
            here = _expert_bytes(entries, layer, self.state.local[layer].start)
            for g in experts:
                sizes[(layer, g)] = here
                holders[(layer, g)] = [r for r, ranges in enumerate(self.local) if ranges[layer][0] <= g < ranges[layer][1]]
        everyone = list(range(self.world))
        writers = pec.assign_writers(sizes, {u: holders.get(u, everyone) for u in sizes}, self.world, load)
        return writers, load

    def _objects(self) -> dict:
        """This rank's non-tensor state, pickled (DCP would otherwise flatten nested lists and dicts into keys)."""
        out = {f"rank{self.rank}/rng": rng_state()}
        out.update({f"rank{self.rank}/{name}": obj.state_dict() for name, obj in self.stateful.items()})
        if self.rank == 0 and self.optimizer is not None:
            out["optim/param_groups"] = [{**{k: v for k, v in g.items() if k != "params"},
                                          "params": [self._param_names[id(p)] for p in g["params"]]}
                                         for g in self.optimizer.param_groups]
        return {k: io.BytesIO(pickle.dumps(v, protocol=pickle.HIGHEST_PROTOCOL)) for k, v in out.items()}

    def _persist(self, staged, tmp: Path, name: str, manifest: dict) -> None:
        """Background: once the snapshot is copied, DCP writes its persist subset (all ranks', on the group of
        the background writes; one top-level key: DCP wraps each in a logging call, ~0.1 ms apiece); then
        rank 0 commits it and collects garbage. dcp.save here rather than dcp.async_save on the training
        thread: that one starts a thread per call and plans there, ~2 ms of blocked time per checkpoint."""
        dcp.save(staged.result(), storage_writer=dcp.FileSystemWriter(tmp), process_group=self.group,
                 no_dist=not self.distributed)
        if self.rank != 0:
            return
        if not (tmp / ".metadata").exists():
            raise RuntimeError(f"PECCheckpointer: DCP finished without {tmp / '.metadata'}; not committing {name}")
        storage.write_json(tmp / storage.MANIFEST, manifest)
        final = self.directory / name
        if final.exists():  # the same step saved again (a resumed run): the new one replaces it
            storage.remove(final)
        os.rename(tmp, final)
        storage.fsync_dir(self.directory)
        storage.write_json(self.directory / "index.json", {"newest": name, "step": manifest["step"],
                                                          "holders": manifest["holders"]})
        manifests = storage.read_manifests(self.directory, warn=False)[0]
        keep = pec.needed(manifests, self.keep)
        for old in manifests:
            if old not in keep:
                storage.remove(self.directory / old)

    def _refuse_foreign_directory(self) -> None:
        if storage.committed(self.directory):
            raise RuntimeError(f"PECCheckpointer: {self.directory} already holds checkpoints; call restore() "
                               "before training (to resume), or checkpoint into an empty directory")
        self.memory.retain({})  # snapshots of an earlier run into this directory: no use without its checkpoints
        self._restored = True

    # -- collectives -----------------------------------------------------------------------------------------

    def _gather(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def _broadcast(self, obj):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _unit(entry) -> object:
    """What is assigned to one writer: an expert (all its tensors together) or one non-expert key."""
    return (entry.layer, entry.expert) if entry.layer is not None else entry.key


def _expert_bytes(entries, layer: str, expert: int) -> int:
    return sum(e.nbytes for e in entries if e.layer == layer and e.expert == expert)


def _moe_layers(model) -> list:
    from moecompile.report import moe_layers
    return [m for m in moe_layers(model) if m.spec is not None and m.rewritten]


def _memory_root(snapshot_dir) -> Path | None:
    if snapshot_dir is None:
        return None
    try:
        Path(snapshot_dir).mkdir(parents=True, exist_ok=True)
        return Path(snapshot_dir)
    except OSError as err:  # e.g. no /dev/shm on this system
        warnings.warn(f"PECCheckpointer: no snapshots in {snapshot_dir} ({err}); restores read storage only")
        return None


def _device(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
