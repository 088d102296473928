"""Partial Experts Checkpointing (PEC, Cai et al., arXiv 2408.04307): what each checkpoint holds and who writes it.

Pure bookkeeping, no I/O (runtime/checkpoint.py does the saving and loading). The training state is a flat
map of keys to tensors, in two kinds:

    non-expert   model/<fqn>, optim/<fqn>/<state>     every parameter and buffer outside the experts, their
                                                      optimizer state; saved by every checkpoint
    expert e     model/<fqn>[e], optim/<fqn>[e]/<st>  one expert of a stacked [E, ...] parameter, a slice
                 model/<fqn>, optim/<fqn>/<state>     or a whole per-expert parameter (ModuleList experts)

Expert keys name the *global* expert index, so a checkpoint does not depend on how experts were placed over
ranks and loads after a change of world size. An expert's optimizer state follows it: the slices of its
parameters' state tensors; a stacked parameter's scalar state (Adam's `step`) is shared by all its experts
and saved with the non-expert state.

Each checkpoint saves K experts per MoE layer, chosen
    sequential:  (c·K + offset_l + j) mod E for j < K at checkpoint c, offset_l spreading layers apart so one
                 checkpoint's experts fall on different expert-parallel ranks; every expert within ⌈E/K⌉;
                 the snapshot (two levels) adds K_snapshot - K more from a round-robin of their own
    load_aware:  the K experts that processed the most tokens since their last save (ties: the older save)
and the portion of lost tokens after a restore is, per MoE layer, the token-expert assignments made since
each restored expert's save over all assignments so far, averaged over layers (the paper's PLT).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

SELECTIONS = ("sequential", "load_aware")


@dataclass
class Entry:
    """One tensor of the training state: `get()` returns the live tensor (a view for an expert slice)."""
    key: str
    get: object                  # () -> Tensor
    nbytes: int
    layer: str | None = None     # MoE layer name for an expert entry, else None
    expert: int | None = None    # global expert index for an expert entry
    buffer: bool = False         # a module buffer (may change in a forward, unlike parameters)


@dataclass
class StateMap:
    """The training state of (model, optimizer) on this rank, as keyed entries; built once, read each save."""
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    layers: dict[str, int] = field(default_factory=dict)                   # MoE layer → E
    local: dict[str, range] = field(default_factory=dict)                  # MoE layer → experts held here
    _expert_params: dict[str, tuple[str, int | None]] = field(default_factory=dict)  # fqn → (layer, stacked offset)
    _owner: dict[str, int] = field(default_factory=dict)   # per-expert parameter fqn → its global expert index
    _cache: tuple | None = None                            # (optimizer state size, entries)

    @staticmethod
    def of(model: nn.Module, optimizer) -> "StateMap":
        from moecompile.report import moe_layers
        try:
            layers = [m for m in moe_layers(model) if m.spec is not None and m.rewritten]
        except ValueError:
            raise TypeError("PECCheckpointer needs a model returned by moecompile.optimize(): it finds the experts "
                            "in the compiled MoE blocks") from None
        if getattr(model, "_moecompile", None) is None:
            raise ValueError("PECCheckpointer: the model is not compiled yet; pass example_inputs= to "
                             "moecompile.optimize() so the experts are known before training starts")
        state = StateMap(model, optimizer)
        for layer in layers:
            spec, prefix = layer.spec, layer.name + "." if layer.name else ""
            if getattr(getattr(spec.parallel, "layout", None), "shards", 1) > 1:
                raise ValueError(f"PECCheckpointer: {layer.name} holds slices of its experts (adaptive parallelism "
                                 "over more ranks than experts); partial expert checkpoints need whole experts")
            local = spec.parallel.local_experts if spec.parallel is not None else range(spec.num_experts)
            state.layers[layer.name] = spec.num_experts
            state.local[layer.name] = local
            for refs in vars(spec.weights).values():
                if refs is None:
                    continue
                if not isinstance(refs, list):  # one stacked [E_local, ...] parameter
                    state._expert_params[prefix + refs.name] = (layer.name, local.start)
                    continue
                for i, ref in enumerate(refs):  # one parameter per (local) expert
                    state._expert_params[prefix + ref.name] = (layer.name, None)
                    state._owner[prefix + ref.name] = local.start + i
        return state

    def entries(self) -> list[Entry]:
        """Every tensor of the state, keyed; optimizer entries only for state that exists (Adam's is lazy).
        Built again only when the optimizer's state grows; the entries fetch the optimizer's tensors when
        read, so they stay right if it replaces them (load_state_dict)."""
        opt_state = self.optimizer.state if self.optimizer is not None else {}
        signature = sum(len(s) for s in opt_state.values())
        if self._cache is not None and self._cache[0] == signature:
            return self._cache[1]
        params = dict(self.model.named_parameters())
        out = []
        for fqn, t in self.model.state_dict(keep_vars=True).items():
            p = params.get(fqn)
            split = self._split(f"model/{fqn}", fqn, t, _const(t), p)
            for e in split:
                e.buffer = p is None
            out += split
            for name, s in opt_state.get(p, {}).items() if p is not None else ():
                if torch.is_tensor(s):
                    out += self._split(f"optim/{fqn}/{name}", fqn, s, _live(opt_state, p, name), p)
        self._cache = (signature, out)
        return out

    def _split(self, key: str, fqn: str, t: torch.Tensor, fetch, param) -> list[Entry]:
        if fqn not in self._expert_params:
            return [Entry(key, fetch, t.nbytes)]
        layer, offset = self._expert_params[fqn]
        if offset is None:
            return [Entry(key, fetch, t.nbytes, layer, self._owner[fqn])]
        if param is None or t.shape != param.shape:  # scalar state of a stacked parameter: shared by its experts
            return [Entry(key, fetch, t.nbytes)]
        head, _, tail = key.partition(fqn)
        return [Entry(f"{head}{fqn}[{offset + i}]{tail}", _slice(fetch, i), t[i].nbytes, layer, offset + i)
                for i in range(t.shape[0])]

    def fingerprint(self) -> dict:
        """What identifies the model a checkpoint belongs to, the same on every rank and world size: each
        non-expert model tensor's shape, and per MoE layer E and one expert's tensor shapes."""
        non_expert, expert = {}, {}
        for e in self.entries():
            if not e.key.startswith("model/"):
                continue
            shape = list(e.get().shape)
            if e.layer is None:
                non_expert[e.key] = shape
            elif e.expert == self.local[e.layer].start:
                expert.setdefault(e.layer, []).append(shape)
        return {"non_expert": non_expert,
                "experts": {layer: {"num_experts": E, "shapes": sorted(expert.get(layer, []))}
                            for layer, E in self.layers.items()},
                "optimizer": type(self.optimizer).__name__ if self.optimizer is not None else None}


def _const(t):
    return lambda: t


def _live(opt_state, param, name):
    return lambda: opt_state[param][name]


def _slice(fetch, i):
    return lambda: fetch()[i]


def fingerprint_difference(saved: dict, current: dict) -> str | None:
    """A sentence on how two fingerprints differ, or None when they match."""
    for part, what in (("optimizer", "optimizer"), ("experts", "MoE layers"), ("non_expert", "non-expert tensors")):
        a, b = saved.get(part), current.get(part)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diff = sorted(set(a) ^ set(b)) or [k for k in a if a[k] != b[k]]
            return f"{what} differ, e.g. {diff[0]!r}: checkpoint {a.get(diff[0])}, model {b.get(diff[0])}"
        return f"{what} differ: checkpoint {a!r}, model {b!r}"
    return None


def sequential(counter: int, layers: dict[str, int], k: int) -> dict[str, list[int]]:
    """The experts checkpoint number `counter` saves per layer, round-robin; layer l starts offset l·E/L."""
    out = {}
    for l, (layer, E) in enumerate(layers.items()):
        offset = l * E // len(layers)
        out[layer] = sorted({(counter * k + offset + j) % E for j in range(min(k, E))})
    return out


def sequential_snapshot(counter: int, layers: dict[str, int], k: int, k_snapshot: int) -> dict[str, list[int]]:
    """The experts checkpoint number `counter` copies to memory: the k it persists and k_snapshot - k more from
    a round-robin of their own (same layer offsets), so that every expert is in memory within
    ⌈E / (k_snapshot - k)⌉ checkpoints: with k_snapshot - k >= E/3, the three snapshots a rank keeps hold a
    version of every expert from the last three checkpoints."""
    persist, extra = sequential(counter, layers, k), max(k_snapshot - k, 0)
    out = {}
    for l, (layer, E) in enumerate(layers.items()):
        chosen, e = set(persist[layer]), counter * extra + l * E // len(layers)
        while len(chosen) < min(k_snapshot, E):
            chosen.add(e % E)
            e += 1
        out[layer] = sorted(chosen)
    return out


def load_aware(unsaved: dict[str, list[int]], age: dict[str, list[int]], k: int) -> dict[str, list[int]]:
    """Per layer the k experts with the most tokens since their save, ties to the longest unsaved (age = the
    checkpoint counter of its last save; lower is older), then the lower index. One order for every k, so
    the choice for a smaller k (persist) is inside the one for a larger (snapshot)."""
    return {layer: sorted(sorted(range(len(tokens)), key=lambda e: (-tokens[e], age[layer][e], e))[:k])
            for layer, tokens in unsaved.items()}


def assign_writers(sizes: dict[str, int], holders: dict[str, list[int]], ranks: int,
                   load: list[int] | None = None) -> dict[str, int]:
    """Each key to one of the ranks holding it, balancing bytes: largest first, to the least-loaded holder
    (the paper's greedy; per tensor rather than per layer, which balances better). `load`: bytes each rank
    already has (it is updated)."""
    load = load if load is not None else [0] * ranks
    out = {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        rank = min(holders[key], key=lambda r: (load[r], r))
        out[key] = rank
        load[rank] += sizes[key]
    return out


def portion_lost(cumulative: dict[str, list[int]], at_save: dict[str, list[int]], lost_before: dict[str, int]
                 ) -> tuple[float, float, dict[str, int]]:
    """PLT of one restore: (this restore's, cumulative over every restore so far, lost assignments per layer).
    `cumulative[l][e]`: assignments to expert e of layer l up to the checkpoint restored; `at_save[l][e]`: up to
    the save of the version of e restored; `lost_before`: assignments lost at earlier restores."""
    fault, total, lost = [], [], {}
    for layer, counts in cumulative.items():
        seen = sum(counts)
        now = sum(c - s for c, s in zip(counts, at_save[layer]))
        lost[layer] = lost_before.get(layer, 0) + now
        fault.append(now / seen if seen else 0.0)
        total.append(lost[layer] / seen if seen else 0.0)
    mean = (lambda xs: sum(xs) / len(xs) if xs else 0.0)
    return mean(fault), mean(total), lost


def attributed_plt(lost: dict[str, int], lost_at_k: dict[str, int], cumulative: dict[str, list[int]]) -> float:
    """Dynamic-K's measure: the portion of lost tokens of the restores made since K was last set (`lost_at_k`:
    the lost assignments per layer then), over all assignments so far, averaged over layers."""
    parts = [(lost.get(l, 0) - lost_at_k.get(l, 0)) / sum(c) for l, c in cumulative.items() if sum(c)]
    return sum(parts) / len(parts) if parts else 0.0


def needed(manifests: dict[str, dict], keep: int) -> set[str]:
    """Checkpoint directories a restore from any of the `keep` newest may read: those and, for each, the
    directories holding each expert's newest version as of it. Everything else may be deleted."""
    out = set()
    for name in sorted(manifests, key=lambda n: manifests[n]["step"])[-keep:]:
        out.add(name)
        for holders in manifests[name]["holders"].values():
            out.update(holders)
    return out
