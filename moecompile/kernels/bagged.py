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
0.97 at 8 (1.03), 0.81 at 12 (1.00): there, at most E slots (slots_on_threads). (Those runs timed in a
fixed order, the grouped path right after Hugging Face's, which reads its ratios up to ~10% low: at the
3·E bound the two forms are then about level.)

The copy costs the experts' bytes once more: it is built at the first call that takes this form (training
never does), bounded over a model by optimize(decode_copy_bytes=), and rebuilt when its source changes: another
tensor, another storage, or a bumped version counter (optimizer steps, load_state_dict, nn.init, in-place ops
under no_grad all bump it). Writes through `.data` bypass the counter, so a fixed sample of each source's
elements is compared with the copy's on every call too: a dense change (a merged adapter, an EMA update)
cannot go unseen; a change of only a few elements outside the sample can. Where the weights change between
every two calls (RENEWALS copies in a row), the block stops copying (ir/fast_path.py).
"""
import dataclasses
import functools
import weakref

import torch

from moecompile.kernels.activations import expert_activation, split_gate_up

SLOTS_PER_EXPERT = 3
SAMPLE = 64  # elements of each source compared on every call
PART_BYTES = 1 << 20  # the least a part of a cut bag reads (_bags)
RENEWALS = 3  # copies made in a row, each stale at its first reuse, after which a block stops making them


def bag_ffn(x, weights, indices, kept, activation, fused, alpha, limit, threads=None):
    """dispatch + expert_ffn + combine for x [T, D], routing weights and indices [T, k], T·k > 0, over the
    tables `kept` (kept_tables, renewed) of the stacked w1, w2 and w3 (None: fused or no up projection), no biases →
    out [T, D] = Σ_j weights[t, j] · expert_{indices[t, j]}(x[t]). With caches cold, as a decode step finds
    them, each call into torch costs 5-20 µs even for a view: the steps below are the fewest found."""
    T, k = indices.shape
    threads = threads or torch.get_num_threads()
    flat = indices.view(-1)                                                         # [S] slots, t-major
    rows = kept.rows_in.index_select(0, flat)                                       # [S, D] a bag per slot
    v = torch.cat([x] * k, 1) if k > 1 else x  # [T, k·D] each slot's token (one op: 46 µs cold, against 82
    # for unsqueeze, expand and a reshape's copy)
    g1 = _bags(rows, kept.t1, v, T * k, threads)                                    # [S, F1]
    u = None if kept.t3 is None else _bags(rows, kept.t3, v, T * k, threads)        # [S, F]
    h = expert_activation(*split_gate_up(g1, u, fused), activation, alpha, limit)   # [S, F] a new tensor
    h.mul_(weights.view(-1, 1))  # the combine's weight, folded into the second bags
    rows = kept.rows_hidden.index_select(0, flat)                                  # [S, F]
    return _bags(rows, kept.t2, h, T, threads)                                      # [T, D] a bag per token


def _bags(rows, table, v, B, threads):
    """[B, out]: Σ_i v[b, i] · table[rows[b, i]] for each of B bags, rows and v holding each bag's n rows in
    turn (any shape, contiguous). embedding_bag spreads bags over threads, not one bag's rows: with fewer
    bags than threads, bags are cut in parts of at least PART_BYTES, summed after. Measured (2 threads, in
    turns, caches evicted): a Mixtral-like layer at 1 token, whose second bags are one of 4 MB, 1.55× and
    1.47× Hugging Face's cut in two against 1.42× and 1.38× whole; a Qwen3-MoE-like one, one bag of 1 MB,
    the same cut or whole (1.84-1.88× against 1.85×, in shuffled order; an earlier 1.82 against 1.99 was the
    fixed order's bias), so bags that small stay whole."""
    n = rows.numel() // B
    row_bytes = table.shape[1] * table.element_size()
    parts = 1
    while B * parts < threads and n % (2 * parts) == 0 and n // (2 * parts) * row_bytes >= PART_BYTES:
        parts *= 2
    # aten's op itself, with kept offsets, not F.embedding_bag (its checks, an arange and a reshape per call):
    # a 1-token layer call 1.13 → 1.06 ms Qwen3-MoE-like, 1.51 → 1.44 Mixtral-like (in turns, caches evicted).
    # padding_idx None: -1 would name the table's last row
    out = torch.embedding_bag(table, rows.view(-1), _starts(B * parts, n // parts), False, 0, False,
                              v.reshape(-1), False, None)[0]                                    # [B·parts, out]
    return out if parts == 1 else out.view(B, parts, -1).sum(1)


@functools.lru_cache(maxsize=64)
def _starts(bags: int, size: int) -> torch.Tensor:
    """Offsets of `bags` bags of `size` rows each, made once per shape (a plain tensor, whatever mode the
    first call is in; on the CPU, where this form runs)."""
    with torch.inference_mode(False):
        return torch.arange(0, bags * size, size)


def slots_on_threads(most: int, threads: int | None = None) -> int:
    """The most slots a call takes this form with on `threads` (None: those torch runs on now), given the
    most on two or more (`spec.bag_slots`)."""
    return most if (threads or torch.get_num_threads()) > 1 else most // SLOTS_PER_EXPERT


def takes(*weights) -> bool:
    """Whether these weights suit the form: fp32 on CPU, as select_kernels admitted the block (a model moved
    or cast since keeps to the other paths), contiguous (each call's check reads a strided view of each; a
    block's stacked Parameters are). Checked when a copy is made: while it stays current (Tables.current),
    so do they. The tokens' own check is the caller's (fp32 on CPU)."""
    return all(w is None or (w.is_contiguous() and w.dtype == torch.float32 and w.device.type == "cpu")
               for w in weights)


def table_bytes(*weights) -> int:
    """What renewed keeps for these stacked weights (None: absent)."""
    return sum(w.numel() * w.element_size() for w in weights if w is not None)


@dataclasses.dataclass
class Tables:
    t1: torch.Tensor              # [E·D, F1] w1's table (row e·D + i = w1[e, :, i])
    t2: torch.Tensor              # [E·F, D]  w2's
    t3: torch.Tensor | None       # [E·D, F]  w3's
    rows_in: torch.Tensor         # [E, D] e·D + i: expert e's rows of t1 and t3
    rows_hidden: torch.Tensor     # [E, F] e·F + j: its rows of t2
    sources: list                 # per weight: (weakref to it, its data_ptr, its _version), None if absent
    samples: list                 # per weight: a view of SAMPLE of its elements, and their values
    renewals: int = 0             # copies made in a row, each found stale at its first reuse
    used: bool = False            # served a call after the one that made it

    def current(self, weights) -> bool:
        for w, source, (view, values) in zip(weights, self.sources, self.samples):
            if source is None:
                if w is not None:
                    return False
                continue
            ref, ptr, version = source
            if ref() is not w or w.data_ptr() != ptr or w._version != version or not torch.equal(view, values):
                return False
        return True


_KEPT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # block → Tables (not pickled or copied)


def kept_tables(block, w1, w2, w3) -> Tables | None:
    """The tables of block's stacked weights w1 [E, F1, D], w2 [E, D, F], w3 [E, F, D] (None: absent), as
    bag_ffn takes them, kept from an earlier call, if still current; else None (renewed makes new ones)."""
    kept = _KEPT.get(block)
    if kept is None or not kept.current((w1, w2, w3)):
        return None
    kept.used = True
    return kept


def renewed(block, w1, w2, w3) -> Tables | None:
    """New tables for block's weights (`takes` must hold for them), replacing any kept. None where the
    weights change between every two calls (RENEWALS copies in a row never reused: a sharded model's weights
    gathered anew each call, say): the copy would cost each call more than the form saves."""
    weights = (w1, w2, w3)
    kept = _KEPT.pop(block, None)  # popped: a stale copy is freed before the new one is made
    renewals = 0 if kept is None or kept.used else kept.renewals + 1
    if renewals >= RENEWALS:
        return None
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, whatever mode the first call is in
        t1, t2, t3 = (None if w is None else w.transpose(1, 2).reshape(-1, w.shape[1]) for w in weights)
        E, F_, D = w2.shape[0], w2.shape[2], w2.shape[1]
        ids = functools.partial(torch.arange, device=w2.device)
        kept = Tables(t1, t2, t3, ids(E * D).view(E, D), ids(E * F_).view(E, F_),
                      [None if w is None else (weakref.ref(w), w.data_ptr(), w._version) for w in weights],
                      [(None, None) if w is None else _sample(w) for w in weights], renewals)
    _KEPT[block] = kept
    return kept


def _sample(w: torch.Tensor):
    """(a view of SAMPLE elements spread over contiguous w, their values now)."""
    view = w.detach().view(-1)[::max(w.numel() // SAMPLE, 1)][:SAMPLE]
    return view, view.clone()
