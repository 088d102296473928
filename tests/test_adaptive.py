"""Adaptive parallelism (runtime/adaptive.py) on 2 and 4 gloo processes: every r of one layout equals one process
on the global batch, outputs and every gradient, and the ranks' expert slices partition the expert weights.

Where each rank's slice sits in the full parameter is found from the values (random floats, all distinct), not
from the layout code under test; so is the gradient each slice must have.
"""
import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

import moecompile
from moecompile.models import gpt_moe
from moecompile.runtime.expert_parallel import reduce_gradients
from moecompile.validation import max_relative_error
from tests import hf_zoo
from moecompile.runtime.spawn import run_ranks
from tests.test_expert_parallel import GRAD_FLOOR, TOL, _global_batch, _logits, _loss, _slice

BUILDERS = {
    "gpt_moe": lambda e: gpt_moe(n_layer=2, d_model=32, d_ff=64, n_head=4, num_experts=e, top_k=min(2, e),
                                 max_seq=16),                                 # per-expert Linear weights, biases
    "mixtral": lambda e: hf_zoo.mixtral(num_local_experts=e, num_experts_per_tok=min(2, e)),  # stacked, fused halves
    "gpt_oss": lambda e: hf_zoo.gpt_oss(num_local_experts=e, num_experts_per_tok=min(2, e)),  # interleaved, [in, out], b2
    "switch": lambda e: hf_zoo.switch(num_experts=e),                          # per-sequence capacity, drops
}


def _build(family, experts):
    """The model with every parameter redrawn as a shuffled uniform grid of its mean and spread (at least
    0.02): no two entries equal, so a slice's place in the full parameter is known from its values."""
    torch.manual_seed(0)
    model = BUILDERS[family](experts)
    with torch.no_grad():
        for p in model.parameters():
            grid = torch.randperm(p.numel()).to(p.dtype) * (2 / p.numel()) - 1                # [-1, 1)
            half = 3 ** 0.5 * max(p.std().item() if p.numel() > 1 else 0.0, 0.02)
            p.copy_((p.mean() + half * grid).view_as(p))
    return model


def _positions(local: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Flat indices into `full` of `local`'s entries, found by value."""
    values, order = full.detach().flatten().sort()
    assert values.unique().numel() == values.numel(), "equal entries: positions would be ambiguous"
    at = torch.searchsorted(values, local.detach().flatten()).clamp(max=values.numel() - 1)
    assert torch.equal(values[at], local.detach().flatten()), "a slice entry is not in the full parameter"
    return order[at]


def _cases(rank, ws, cases):
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("ep",))
    errors, owned = {}, {}
    for family, experts, overlap, *options in cases:
        options = dict(options[0]) if options else {}
        args, kwargs = _global_batch(family, 2 * ws)
        local_args, local_kwargs = _slice((args, kwargs), rank, ws)
        ref = moecompile.optimize(_build(family, experts), args, kwargs)
        _loss(ref(*args, **kwargs)).backward()
        want = dict(ref.named_parameters())
        floor = GRAD_FLOOR * max(p.grad.abs().max().item() for p in want.values() if p.grad is not None)
        want_logits = _logits(ref(*args, **kwargs)).chunk(ws)[rank].detach()
        fast = moecompile.optimize(_build(family, experts), local_args, local_kwargs, mesh=mesh,
                                   parallelism="adaptive", overlap=overlap, **options)
        layers = [m.spec.parallel for m in moecompile.explain(fast).moe_layers]
        sliced = {n for p in layers for n in p.expert_params}
        where = {n: _positions(p, want[n]) for n, p in fast.named_parameters() if n in sliced}
        owned[family, experts] = {n: (pos, want[n].numel()) for n, pos in where.items()}
        hierarchical = layers[0].ep.hierarchy is not None
        if hierarchical:  # the table's candidates include both all-to-all algorithms
            load = torch.ones(ws, experts, dtype=torch.int64)
            errors[family, experts, overlap, "algorithms"] = \
                float({c.algorithm for c in layers[0].table.predict(load)} != {"linear", "2dh"})
        for r, algorithm in [(r, a) for r in layers[0].layout.choices
                             for a in (("linear", "2dh") if r and hierarchical else ("linear",))]:
            moecompile.set_parallelism(fast, r, algorithm=algorithm)
            for p in fast.parameters():
                p.grad = None
            out = fast(*local_args, **local_kwargs)
            _loss(out).backward()
            reduce_gradients(fast, mesh)
            worst = max_relative_error(_logits(out), want_logits, _logits(out))
            for n, p in fast.named_parameters():
                g = want[n].grad.flatten()[where[n]].view(p.shape) if n in where else want[n].grad
                worst = max(worst, max_relative_error(p.grad, g, p, floor))
            errors[family, experts, overlap, r, algorithm] = worst
    return errors, owned


CASES = {
    2: [("gpt_moe", 8, 1), ("mixtral", 4, 2), ("switch", 4, 2), ("gpt_moe", 1, 1), ("mixtral", 1, 1)],  # W <= E; W > E: s = 2
    4: [("gpt_moe", 8, 2), ("gpt_moe", 2, 1), ("mixtral", 2, 2), ("gpt_oss", 2, 1), ("gpt_oss", 1, 1),  # s = 2, 4
        ("gpt_moe", 2, 2, {"ranks_per_node": 2})],  # 2 "nodes" x 2: the rows travel by both all-to-alls
}


@pytest.mark.parametrize("ws", [2, 4])
def test_every_r_matches_one_process(ws):
    results = run_ranks(_cases, ws, CASES[ws])
    errors = {k: max(r[0][k] for r in results) for k in results[0][0]}
    rs = {(f, e): sorted({k[3] for k in errors if k[:2] == (f, e) and k[3] != "algorithms"})
          for f, e, *_ in CASES[ws]}
    for f, e, *_ in CASES[ws]:  # every parallelism of the layout ran: 0, and the divisors of W/E
        s = max(1, ws // e)
        assert rs[f, e] == [0] + [r for r in range(1, s + 1) if s % r == 0], (f, e, rs[f, e])
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert not bad, f"{ws} ranks: relative errors {bad}"
    for key in results[0][1]:  # the ranks' slices partition every sliced parameter: each entry owned once
        for name, (_, numel) in results[0][1][key].items():
            pos = torch.cat([r[1][key][name][0] for r in results if name in r[1][key]])
            assert torch.equal(pos.sort().values, torch.arange(numel)), (key, name)


def test_layout_errors_say_what_fits():
    from moecompile.runtime.adaptive import Layout
    with pytest.raises(ValueError, match="8 experts to split evenly over the 3 ranks"):
        Layout.check(3, 8, 64, 32)
    with pytest.raises(ValueError, match=r"hidden size \(6\) and model width \(32\) multiples of 4"):
        Layout.check(4, 1, 6, 32)
    assert Layout(4, 1, 2).choices == (0, 1, 2, 4) and Layout(2, 8, 1).choices == (0, 1)
    with pytest.raises(ValueError, match="1-D mesh"):
        moecompile.optimize(gpt_moe(n_layer=2, d_model=32, d_ff=64), (torch.zeros(1, 4, dtype=torch.long),),
                            parallelism="adaptive")


TABLE_CALLS = 3 * 2 + 1  # at most TRIALS candidates x calls each, and one call more to record the last


def _table_case(rank, ws):
    """gpt_moe with its adaptive tables choosing r and the degree per step: every step equals one process, and
    after TABLE_CALLS training calls each table has measured its trials and chosen, the same on every rank."""
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("ep",))
    args, kwargs = _global_batch("gpt_moe", 2 * ws)
    local_args, local_kwargs = _slice((args, kwargs), rank, ws)
    ref = moecompile.optimize(_build("gpt_moe", 8), args, kwargs)
    want = _logits(ref(*args, **kwargs)).chunk(ws)[rank].detach()
    fast = moecompile.optimize(_build("gpt_moe", 8), local_args, local_kwargs, mesh=mesh, parallelism="adaptive",
                               overlap="auto")
    worst, seen = 0.0, set()
    for _ in range(TABLE_CALLS):
        out = fast(*local_args, **local_kwargs)
        _loss(out).backward()
        worst = max(worst, max_relative_error(_logits(out), want, _logits(out)))
        seen |= {(m.spec.parallel.r, m.spec.parallel.ep.chunks) for m in moecompile.explain(fast).moe_layers}
    tables = [m.spec.parallel.table for m in moecompile.explain(fast).moe_layers]
    chosen = [(key, str(e.chosen), sorted(map(str, e.trials)), len(e.predicted))
              for t in tables for key, e in t.entries.items()]
    return worst, chosen, sorted(seen), moecompile.explain(fast).moe_layers[0].details


def test_table_chooses_per_bucket_and_keeps_results():
    results = run_ranks(_table_case, 2)
    worst = max(r[0] for r in results)
    assert worst < TOL, f"relative error {worst:.2e}"
    chosen, seen, report = results[0][1], results[0][2], results[0][3]
    assert chosen and all(r[1] == chosen for r in results), [r[1] for r in results]  # agreed by every rank
    for key, choice, trials, predicted in chosen:
        assert choice != "None" and choice in trials and 1 <= len(trials) <= 3
        assert predicted == 4  # r = 0 at degree 1; r = 1 at degrees 1, 2, 4
    assert len(seen) == len(chosen[0][2]), (seen, chosen)  # each trial ran
    assert "adaptive table by capacity bucket" in report and "measured ms fwd+bwd" in report, report


def _table_policy(rank, ws):
    """AdaptiveTable alone, with made-up predictions and measurements (one rank)."""
    from moecompile.runtime.adaptive_table import AdaptiveTable, Choice
    predicted = {Choice(1, 2): 1.0, Choice(1, 4): 1.1, Choice(1, 1): 1.3, Choice(0, 1): 1.9, Choice(2, 1): 2.5}
    table = AdaptiveTable(lambda load: predicted, None, window=128)
    load = torch.tensor([[100, 20], [30, 40]])                                   # c = 100: bucket 0
    picks = []
    for seconds in {Choice(1, 2): 0.9, Choice(1, 4): 0.8, Choice(0, 1): 0.5}.values():  # measured per trial
        for _ in range(table.calls):
            key, choice = table.pick(load, training=True)
            picks.append(str(choice))
            table.record(key, choice, seconds)
    entry = table.entries[0]
    key_later, choice_later = table.pick(load + 27, training=True)                # c = 127: the same bucket
    _, untrained = table.pick(load + 300, training=False)                        # a new bucket, no grad
    return (sorted(map(str, entry.trials)), picks, str(entry.chosen), str(choice_later), key_later,
            str(untrained), sorted(table.entries), table.summary())


def test_table_tries_each_plausible_r_then_keeps_the_fastest():
    trials, picks, chosen, later, key, untrained, keys, summary = run_ranks(_table_policy, 1)[0]
    # each r's best-predicted candidate unless > cutoff (2x) the best (r=2 at 2.5 is not tried), and one more
    # within the slack (1.25x): r=1 d=4; r=1 d=1 at 1.3x is not
    assert trials == ["r=0 d=1", "r=1 d=2", "r=1 d=4"], trials
    assert picks == ["r=1 d=2"] * 2 + ["r=1 d=4"] * 2 + ["r=0 d=1"] * 2, picks  # in predicted order, 2 calls each
    assert chosen == later == "r=0 d=1" and key == 0  # the measured fastest, kept for the bucket
    assert untrained == "r=1 d=2" and keys == [0, 3]  # no grad: the predicted best of the new bucket
    assert "r=0 d=1 500.0 (predicted 1900.0)" in summary, summary
