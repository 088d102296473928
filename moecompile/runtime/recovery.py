"""PECCheckpointer.restore(): the newest complete checkpoint, each expert from its newest version in storage or
in the node's memory, the portion of lost tokens (PLT) of what was actually restored, and Dynamic-K.

    rank 0: the newest checkpoint in storage that is complete with every directory it names (runtime/storage.py)
    every rank: its complete in-memory snapshots (runtime/snapshot.py), gathered
    per expert: the newest version among its storage holder and the snapshots of that checkpoint's lineage no
        newer than it (a snapshot counts only if its checkpoint committed): all ranks compute the same choice
    read into fresh tensors: non-expert state and storage versions from storage, memory versions from the
        snapshot of the rank holding them (broadcast to the other ranks holding the expert); then copy into
        the model and optimizer, only once every read has succeeded
    PLT from the versions restored; Dynamic-K: K doubles when the PLT since K was last set exceeds the limit

A rank whose node lost its memory has no snapshots, so its experts come from storage, or from another rank's
memory when a data-parallel replica kept them. Non-expert state always comes from storage: every rank then
has the same, whichever memory survived (the paper's recovery, Fig. 8).
"""
from __future__ import annotations

import io
import logging
import pickle
import random
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from moecompile.runtime import pec, storage

log = logging.getLogger("moecompile.checkpoint")


class PLTExceeded(RuntimeError):
    """restore() refused: the portion of lost tokens is above the user's `max_plt`."""


@dataclass
class RestoreReport:
    step: int                      # the checkpoint's step; training resumes at step + 1
    directory: str
    older_experts: dict[str, dict[int, int]] = field(default_factory=dict)  # layer → {expert: step of its version}
    plt: float = 0.0               # portion of lost tokens of this restore (the versions restored)
    plt_total: float = 0.0         # over every restore of this run
    skipped: list[str] = field(default_factory=list)  # checkpoint directories found unusable
    from_memory: dict[str, dict[int, int]] = field(default_factory=dict)  # layer → {expert: rank whose memory}
    plt_storage: float = 0.0       # what this restore would have lost reading storage only
    experts_per_ckpt: int = 0      # K_persist and K_snapshot from now on (Dynamic-K may have doubled them)
    experts_per_snapshot: int = 0
    k_raised: tuple[int, int] | None = None  # Dynamic-K: (K_persist before, after) when it doubled K
    attributed_plt: float = 0.0    # Dynamic-K's measure: lost since K was last set, over all assignments


class Restoring:
    """restore() and its parts, for PECCheckpointer (runtime/checkpoint.py), whose state they read and set."""

    def restore(self) -> int:
        """Load the newest complete checkpoint: non-expert state from it, each expert from its newest version
        (storage, or a snapshot in memory). Returns the step to resume at (0 when there is none). Logs and
        records the portion of lost tokens; raises PLTExceeded above `max_plt`, and ValueError for a
        checkpoint of another model."""
        self.wait()
        self._restored = True
        self._inventory = self.memory.inventory()
        inventories = self._gather([{k: s[k] for k in ("slot", "step", "run", "experts")} for s in self._inventory])
        skipped = []
        while True:
            plan = self._broadcast(self._plan(skipped) if self.rank == 0 else None)
            if isinstance(plan, Exception):
                raise plan
            if plan is None:
                self.memory.retain({})
                return 0
            name, m, bad_dirs = plan
            sources = {} if "memory" in skipped else _memory_sources(m, inventories)
            report = self._report(name, m, sources, bad_dirs)
            if self.max_plt is not None and report.plt_total > self.max_plt:
                raise PLTExceeded(f"PECCheckpointer: restoring {report.directory} loses {report.plt_total:.2%} of "
                                  f"the token-expert assignments so far (this restore {report.plt:.2%}), above "
                                  f"max_plt={self.max_plt:.2%}")
            bad = self._load(name, m, sources)
            bad = sorted(set().union(*self._gather(bad))) if self.distributed else bad
            if not bad:
                break
            warnings.warn(f"PECCheckpointer: could not read {', '.join(bad)}; trying an older checkpoint")
            skipped += bad
        self._adopt(m, report, sources)
        return m["step"] + 1

    def _plan(self, skipped: list[str]):
        """Rank 0: (name, manifest, unusable directories) of the checkpoint to restore, None when there is none,
        or the error."""
        try:
            manifests, damaged = storage.read_manifests(self.directory, warn=True)
            for name, m in manifests.items():
                why = pec.fingerprint_difference(m["fingerprint"], self.fingerprint)
                if why is not None:
                    return ValueError(f"PECCheckpointer: {self.directory / name} is a checkpoint of another model "
                                      f"({why}); point the checkpointer at this model's directory")
            bad = set(skipped) | set(damaged)
            name = storage.newest_restorable(self.directory, manifests, bad)
            if name is not None:
                return name, manifests[name], sorted(bad)
            if manifests:
                return RuntimeError(f"PECCheckpointer: no checkpoint in {self.directory} can be restored "
                                    f"({', '.join(sorted(bad))} unusable)")
            return None
        except Exception as err:  # every rank must hear of it, not just rank 0
            return err

    def _report(self, name: str, m: dict, sources: dict, skipped: list[str]) -> RestoreReport:
        stored = {l: [s[0] for s in saves] for l, saves in m["saved_at"].items()}
        plt_storage, _, _ = pec.portion_lost(m["cumulative"], stored, m["lost"])
        plt, plt_total, _ = pec.portion_lost(m["cumulative"], _at_save(m, sources), m["lost"])
        version = {l: {e: sources[(l, e)][2] if (l, e) in sources else _step(h) for e, h in enumerate(hs)}
                   for l, hs in m["holders"].items()}
        older = {l: {e: s for e, s in v.items() if s != m["step"]} for l, v in version.items()}
        memory = {}
        for (l, e), (w, *_rest) in sorted(sources.items()):
            memory.setdefault(l, {})[e] = w
        return RestoreReport(m["step"], name, {l: o for l, o in older.items() if o}, plt, plt_total, skipped,
                             memory, plt_storage, self.k, self.k_snapshot)

    def _load(self, name: str, m: dict, sources: dict) -> list[str]:
        """Read this rank's state into fresh tensors (memory versions first: a collective), then into the model
        and optimizer; nothing is changed if a read fails. Returns the directories that could not be read."""
        opt = self.optimizer
        if opt is not None and any(p not in opt.state for g in opt.param_groups for p in g["params"]):
            get_optimizer_state_dict(self.model, opt)  # creates the lazy optimizer state (Adam's) to load into
        from_memory = self._receive(sources)
        keys_in, fresh, absent = {}, {}, set()  # absent: optimizer state not saved (no step of its parameter yet)
        for e in self.state.entries():
            where = "memory" if (e.layer, e.expert) in sources else \
                m["holders"][e.layer][e.expert] if e.layer is not None else name
            if where not in keys_in:
                try:
                    keys_in[where] = from_memory if where == "memory" else storage.saved_keys(self.directory / where)
                except Exception as err:
                    log.warning("PECCheckpointer: reading %s failed: %s", where, err)
                    return [where]
            if e.key not in keys_in[where]:
                if e.key.startswith("optim/"):
                    absent.add(e.key.split("/")[1].split("[")[0])
                    continue
                return [where]
            fresh.setdefault(where, {})[e.key] = (e, None if where == "memory" else
                                                  torch.empty_like(e.get(), device="cpu"))
        own = f"rank{self.rank}" if self.rank < m["world_size"] else "rank0"
        objects = [f"{own}/rng"] + [f"{own}/{n}" for n in self.stateful] + (["optim/param_groups"] if opt else [])
        loaded = {}
        for where in {name} | set(fresh) - {"memory"}:
            state = {k: t for k, (_, t) in fresh.get(where, {}).items()}
            if where == name:
                state.update({key: io.BytesIO() for key in objects})
            try:
                storage.load(self.directory / where, state)  # puts what it reads into `state`
            except Exception as err:
                log.warning("PECCheckpointer: reading %s failed: %s", where, err)
                return [where]
            loaded.update({key: state[key] for key in objects if where == name})
        with torch.no_grad():
            for where, part in fresh.items():
                for key, (e, t) in part.items():
                    e.get().copy_(from_memory[key] if where == "memory" else t)
        loaded = {key: pickle.loads(buf.getvalue()) for key, buf in loaded.items()}  # our own files
        if opt is not None:
            for group, saved in zip(opt.param_groups, loaded["optim/param_groups"]):
                group.update({k: v for k, v in saved.items() if k != "params"})
            params = dict(self.model.named_parameters())
            for fqn in absent:
                opt.state.pop(params[fqn], None)
        if own == f"rank{self.rank}":
            _set_rng_state(loaded[f"{own}/rng"])
        for n, obj in self.stateful.items():
            obj.load_state_dict(loaded[f"{own}/{n}"])
        return []

    def _receive(self, sources: dict) -> dict[str, torch.Tensor]:
        """The tensors of the experts restored from memory that this rank holds: each read by the rank whose
        snapshot has it, sent to the others holding the expert. The same sequence of broadcasts on every rank."""
        out = {}
        for w in range(self.world):
            units = sorted((l, e, slot) for (l, e), (src, slot, *_rest) in sources.items() if src == w)
            if not units:
                continue
            data = None
            if w == self.rank:
                markers = {s["slot"]: s for s in self._inventory}
                data = {}
                for l, e, slot in units:
                    data.update(self.memory.read(markers[slot], markers[slot]["experts"][l][str(e)]["keys"]))
            holders = {r for l, e, _ in units for r, ranges in enumerate(self.local)
                       if ranges[l][0] <= e < ranges[l][1]}
            if holders - {w}:
                box = [data]
                dist.broadcast_object_list(box, src=w)
                data = box[0]
            out.update(data or {})
        return out

    def _adopt(self, m: dict, report: RestoreReport, sources: dict) -> None:
        """Continue the restored checkpoint's lineage: its counters, index, lost tokens and K (Dynamic-K)."""
        _, _, self.lost = pec.portion_lost(m["cumulative"], _at_save(m, sources), m["lost"])
        self.counter = m["counter"] + 1
        self.cumulative, self.holders, self.saved_at = m["cumulative"], m["holders"], m["saved_at"]
        # tokens since the checkpoint are replayed: what a restored expert processed after its version's save is
        # counted lost now, and its storage version is as good as new; an expert restored from memory is newer
        # than its storage version, which stays behind by what it was behind
        for layer in self.saved_at:
            self.saved_at[layer] = [s if (layer, e) in sources else [c, s[1]]
                                    for e, (c, s) in enumerate(zip(self.cumulative[layer], self.saved_at[layer]))]
        # manifests written before two levels and Dynamic-K have neither: no snapshot is of their lineage
        self.lineage = m.get("lineage", [])
        dynamic = m.get("dynamic_k", {"persist": 0, "snapshot": 0, "lost_at_k": {}})
        self.lost_at_k = dynamic["lost_at_k"]
        report.attributed_plt = pec.attributed_plt(self.lost, self.lost_at_k, self.cumulative)
        widest = max(self.state.layers.values(), default=0)
        if self.dynamic_k is not None:  # a K that Dynamic-K raised stays raised (a larger one asked for wins)
            self.k, self.k_snapshot = max(self.k, dynamic["persist"]), max(self.k_snapshot, dynamic["snapshot"])
        if self.dynamic_k is not None and report.attributed_plt > self.dynamic_k and self.k < widest:
            report.k_raised = (self.k, min(2 * self.k, widest))
            self.k, self.k_snapshot = report.k_raised[1], min(max(2 * self.k_snapshot, report.k_raised[1]), widest)
            self.lost_at_k = dict(self.lost)
            if self.rank == 0:
                log.warning("PECCheckpointer: Dynamic-K: %.2f%% of the token-expert assignments lost since K was last "
                            "set, above %.2f%%: K_persist %d -> %d, K_snapshot %d", 100 * report.attributed_plt,
                            100 * self.dynamic_k, *report.k_raised, self.k_snapshot)
        report.experts_per_ckpt, report.experts_per_snapshot = self.k, self.k_snapshot
        lineage = {tuple(x) for x in self.lineage}
        self.memory.retain({s["slot"]: s["step"] for s in self._inventory
                            if (s["step"], s["run"]) in lineage and s["step"] <= m["step"]})
        self.last_restore = report
        if self.rank == 0:  # the same report on every rank
            memory = sum(len(v) for v in report.from_memory.values())
            older = sum(len(o) for o in report.older_experts.values())
            log.warning("PECCheckpointer: restored %s (step %d): %d expert(s) from memory, %d from older checkpoints; "
                        "lost tokens %.2f%% (storage alone: %.2f%%), %.2f%% over all restores", report.directory,
                        report.step, memory, older, 100 * report.plt, 100 * report.plt_storage, 100 * report.plt_total)


def _memory_sources(m: dict, inventories: list[list[dict]]) -> dict[tuple[str, int], tuple]:
    """(layer, expert) → (rank, slot, step, cumulative count at that step) for each expert whose newest version
    is in a rank's memory: a snapshot of a committed checkpoint of `m`'s lineage, no newer than `m`, newer than
    the expert's version in storage. The same on every rank (ties: the lower rank)."""
    lineage = {tuple(x) for x in m.get("lineage", [])}
    best = {}
    for w, snapshots in enumerate(inventories):
        for snap in snapshots:
            if (snap["step"], snap["run"]) not in lineage or snap["step"] > m["step"]:
                continue
            for layer, experts in snap["experts"].items():
                for e, unit in experts.items():
                    key, have = (layer, int(e)), _step(m["holders"][layer][int(e)])
                    if snap["step"] > max(have, best.get(key, (0, 0, -1))[2]):
                        best[key] = (w, snap["slot"], snap["step"], unit["count"])
    return best


def _at_save(m: dict, sources: dict) -> dict[str, list[int]]:
    """Per layer and expert, the cumulative token count when the version restored was saved."""
    return {l: [sources[(l, e)][3] if (l, e) in sources else s[0] for e, s in enumerate(saves)]
            for l, saves in m["saved_at"].items()}


def _step(directory: str) -> int:
    return int(directory.split("-")[1])


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])
