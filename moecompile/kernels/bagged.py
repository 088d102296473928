"""Bagged form of a MoE layer's experts, for CPU calls without autograd that have few token-slots: each
slot's expert matmuls as weighted sums of rows (torch's embedding_bag), over a copy of the stacked expert
weights laid out input-major, built once and kept per block.

    table[e·in + i, :] = w[e, :, i]            w [E, out, in]: the nn.Linear layout the block stores
    w[e] @ v = Σ_i v[i] · table[e·in + i]      one bag of `in` rows, weighted by v

Why: at decode sizes the grouped path's per-expert GEMMs, and a bmm over gathered weights, read the weights
at 5-8 GB/s on this machine (MKL's small GEMMs, one thread each), where a plain reduction streams 18-21 GB/s;
embedding_bag streams its rows on every thread at ~18 GB/s. Measured (2 threads, caches evicted before each
call, one layer's time, ratio = Hugging Face eager / this form, against the grouped path's ratio):
Qwen3-MoE-like experts (64 of 0.4 MB, top-8) 2.1 at 1 token (1.27), 2.0 at 8 (1.02) and 16 (1.36), 1.77 at
24 (1.53), 1.55 at 32 (1.58); Mixtral-like (8 of 6 MB, top-2) 1.5-1.7 at 1-8 tokens (1.05-1.17), 1.44 at 12
(1.30), 1.07 at 16 (1.39). So calls of at most SLOTS_PER_EXPERT · E slots take it (select_kernels.bag_slots).
On one thread the grouped path loses less: Qwen3-like 1.88 at 1 token (1.06), 1.43 at 8 (1.09), 1.08 at 32
(1.02), but Mixtral-like, whose experts do not stay in a core's cache between slots, 1.21 at 1 token (1.00),
0.97 at 8 (1.03), 0.81 at 12 (1.00): there, at most E slots (slots_on_threads).

The copy costs the experts' bytes once more: it is built at the first call that takes this form (training
never does), bounded over a model by optimize(decode_copy_bytes=), and rebuilt when its source changes: another
tensor, another storage, or a bumped version counter (optimizer steps, load_state_dict, nn.init, in-place ops
under no_grad all bump it). Writes through `.data` bypass the counter, so a fixed sample of each source's
elements is compared with the copy's on every call too: a dense change (a merged adapter, an EMA update)
cannot go unseen; a change of only a few elements outside the sample can.
"""
import dataclasses
import weakref

import torch
import torch.nn.functional as F

from moecompile.kernels.activations import expert_activation, split_gate_up

SLOTS_PER_EXPERT = 3
SAMPLE = 64  # elements of each source compared on every call


def bag_ffn(x, weights, indices, t1, t2, t3, activation, fused, alpha, limit):
    """dispatch + expert_ffn + combine for x [T, D], routing weights and indices [T, k], over tables
    (tables_for) of the stacked w1, w2 and w3 (None: fused or no up projection), no biases →
    out [T, D] = Σ_j weights[t, j] · expert_{indices[t, j]}(x[t]). T·k > 0."""
    T, k = indices.shape
    D, S = x.shape[1], indices.numel()
    flat = indices.flatten()                                                        # [S]
    v = x.unsqueeze(1).expand(T, k, D).reshape(-1)                                  # [S·D] slot s's x row
    g1 = _bags(t1, flat, D, v, D)                                                   # [S, F1]
    u = _bags(t3, flat, D, v, D) if t3 is not None else None                        # [S, F]
    h = expert_activation(*split_gate_up(g1, u, fused), activation, alpha, limit)   # [S, F]
    h = h * weights.reshape(S, 1).to(h.dtype)  # the combine's weight, folded into the second bags
    F_ = h.shape[1]
    return _bags(t2, flat, F_, h.reshape(-1), k * F_)                               # [T, D]: k slots a bag


def slots_on_threads(most: int) -> int:
    """The most slots a call takes this form with, on the threads torch runs on now, given the most on two
    or more (`spec.bag_slots`)."""
    return most if torch.get_num_threads() > 1 else most // SLOTS_PER_EXPERT


def _bags(table, experts, fan_in, v, per_bag):
    """Σ over each run of `per_bag` entries of v[n] · table[experts[n // fan_in] · fan_in + n % fan_in]."""
    rows = (experts.unsqueeze(1) * fan_in + torch.arange(fan_in, device=v.device)).flatten()  # [S·fan_in]
    starts = torch.arange(0, rows.numel(), per_bag, device=v.device)
    return F.embedding_bag(rows, table, starts, mode="sum", per_sample_weights=v)


def table_bytes(*weights) -> int:
    """What tables_for keeps for these stacked weights (None: absent)."""
    return sum(w.numel() * w.element_size() for w in weights if w is not None)


@dataclasses.dataclass
class _Tables:
    sources: list      # per weight: (weakref to the source tensor, its data_ptr, its _version)
    samples: list      # per weight: its values at `at`
    at: list           # per weight: [SAMPLE] flat positions
    tables: tuple      # per weight: [E·in, out] (None where the weight is None)

    def current(self, weights) -> bool:
        for w, source, at, sample in zip(weights, self.sources, self.at, self.samples):
            if w is None or source is None:
                if w is not source:
                    return False
                continue
            ref, ptr, version = source
            if ref() is not w or w.data_ptr() != ptr or w._version != version:
                return False
            if not torch.equal(torch.take(w, at), sample):
                return False
        return True


_KEPT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # block → _Tables (not pickled or copied)


def tables_for(block, w1, w2, w3) -> tuple:
    """The tables of block's stacked weights w1 [E, F1, D], w2 [E, D, F], w3 [E, F, D] (None: absent), as
    bag_ffn takes them: kept from an earlier call while current, else built now."""
    weights = (w1, w2, w3)
    kept = _KEPT.get(block)
    if kept is not None and kept.current(weights):
        return kept.tables
    _KEPT.pop(block, None)  # free the stale copy before building the new one
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, whatever mode the first call is in
        tables = tuple(None if w is None else w.transpose(1, 2).reshape(-1, w.shape[1]) for w in weights)
        at = [None if w is None else torch.linspace(0, w.numel() - 1, SAMPLE).long() for w in weights]
        samples = [None if w is None else torch.take(w, a) for w, a in zip(weights, at)]
        sources = [None if w is None else (weakref.ref(w), w.data_ptr(), w._version) for w in weights]
    _KEPT[block] = _Tables(sources, samples, at, tables)
    return tables
