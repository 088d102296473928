"""MoE styles of other projects, written here from their published formulations (tests/zoo.py TieredBank,
tests/mask_zoo.py): group-limited routing written as a mask (DeepSeek-V3's node-limited routing, both group
scores) and the one-hot dispatch-mask family (GShard top-2, Switch top-1, ST-MoE top-n). Each is lifted and
equal to eager (outputs, the auxiliary loss, every gradient) or refused with a reason in the user's words."""
import dataclasses
import re

import pytest
import torch

import moecompile
from moecompile.frontend.dispatch_mask import capacity_rule
from moecompile.frontend.graph import Unsupported
from moecompile.validation import max_relative_error
from tests.helpers import assert_same_training_step, expert_parallel_check
from tests.mask_zoo import LedgerLayer, LedgerRoster
from tests.zoo import Net, TieredBank


# ---- group-limited routing as a mask ---------------------------------------------------------------------------
@pytest.mark.parametrize("options,group_score,group_fill", [
    # DeepSeek-V3: sigmoid, a balancing offset, a tier scored by its two best, the rest set to -inf
    (dict(tier_score="pair", fill="-inf", scoring="sigmoid", drift=0.1), "top2sum", "exclude"),
    (dict(tier_score="pair", fill="0", scoring="sigmoid", drift=0.1), "top2sum", "zero"),
    # DeepSeek-V2: softmax, a tier scored by its best; k = 3 > 2 tiers kept, so the mask matters
    (dict(tier_score="max", fill="0", scoring="softmax", k=3), "max", "zero"),
    (dict(tier_score="max", fill="mul", scoring="sigmoid", k=3, drift=0.1), "max", "zero"),
    (dict(tier_score="best", fill="where", scoring="softmax", k=3), "max", "exclude"),
], ids=["v3-top2sum-inf", "v3-top2sum-zero", "v2-max-zero", "max-times-mask", "max-where-inf"])
@pytest.mark.parametrize("e", [8, 16])
def test_group_limited_routing_written_as_a_mask(options, group_score, group_fill, e):
    torch.manual_seed(0)
    eager = Net(TieredBank(e=e, **options))
    fast = moecompile.optimize(eager)
    assert_same_training_step(eager, fast, (torch.randn(2, 8, 32),), {})
    (layer,) = moecompile.explain(fast).moe_layers
    assert layer.rewritten, layer.reason
    r = layer.spec.route
    assert (r.n_group, r.topk_group, r.group_score, r.group_fill) == (4, 2, group_score, group_fill)
    assert (r.top_k, r.scale, r.renormalize) == (options.get("k", 2), 2.5, options["scoring"] == "sigmoid")
    assert "1 rewritten" in str(moecompile.explain(fast))
    assert_same_training_step(eager, fast, (torch.randn(3, 5, 32),), {})


def test_experts_outside_the_best_groups_are_excluded_not_zeroed():
    """A kept expert's biased score below zero: -inf masking still chooses it, 0 masking would take an
    expert of a group that was not kept. The rewrite reads which, and is equal; read the other way it is not."""
    torch.manual_seed(0)
    eager = Net(TieredBank(tier_score="pair", fill="-inf", keep=1, drift=1.0))
    eager.block.drift.copy_(torch.tensor([0.0, -3.0] * 4))  # every tier: one expert well below zero
    x = torch.randn(4, 16, 32)
    fast = moecompile.optimize(eager, (x,))
    (layer,) = moecompile.explain(fast).moe_layers
    assert layer.rewritten and layer.spec.route.group_fill == "exclude", layer.reason
    assert_same_training_step(eager, fast, (x,), {})
    layer.spec.route = dataclasses.replace(layer.spec.route, group_fill="zero")
    assert (fast(x) - eager(x)).abs().max() > 0.1


# ---- the one-hot dispatch-mask family -----------------------------------------------------------------------
def _step(model, x, cot):
    """(output, aux, gradient of x, of every parameter, of the aux loss alone wrt the router, the per-expert
    counts it returns if any) for the loss <out, cot> + aux."""
    for p in model.parameters():
        p.grad = None
    xi = x.clone().requires_grad_()
    out, aux, *counts = model(xi)
    router = model.ledger.lens.weight
    (aux_grad,) = torch.autograd.grad(aux, router, retain_graph=True)
    ((out * cot).sum() + aux).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), aux.detach(), xi.grad, grads, aux_grad, counts


def assert_same_step_and_aux(eager, fast, x):
    cot = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    want, got = _step(eager, x, cot), _step(fast, x, cot)
    for label, a, b in zip(("output", "aux loss", "input gradient"), got[:3], want[:3]):
        assert max_relative_error(a, b, b) < 1e-5, label
    assert got[3].keys() == want[3].keys()
    for name, g in want[3].items():
        assert max_relative_error(got[3][name], g, g) < 1e-5, f"gradient of {name}"
    assert max_relative_error(got[4], want[4], want[4]) < 1e-5, "gradient of the aux loss alone"
    assert all(torch.equal(a, b) for a, b in zip(got[5], want[5])) and len(got[5]) == len(want[5])
    assert want[1].item() > 0.5  # a real loss: E · Σ P·f is about 1 when balanced


GSHARD = dict(top_k=2, renormalize=True, renormalize_kept=False, later_above=None, factor=0.5, min_capacity=4,
              group="call", balance=1.0, z=0.0, grouped=False)
MASK_STYLES = {  # name → (layer, what the spec must say)
    "gshard-top2": (lambda: LedgerLayer(e=4, slack=0.5), GSHARD),
    # capacity per sequence of S: 4 (the floor) for S = 1 and 8, 2S/4 beyond
    "gshard-top2-per-sequence-groups": (lambda: LedgerLayer(e=4, slack=1.0, grouped=True),
                                        {**GSHARD, "group": "sequence", "grouped": True, "factor": 1.0}),
    "gshard-top2-counts": (lambda: LedgerLayer(e=4, slack=0.5, tally=True), GSHARD),
    "gshard-top2-threshold": (lambda: LedgerLayer(e=4, slack=0.5, later="threshold", bar=0.3),
                              {**GSHARD, "later_above": 0.3}),
    "gshard-top2-torch-spelling": (lambda: LedgerLayer(e=4, slack=0.5, spelling="tensor", kind="gelu"), GSHARD),
    "gshard-top2-modulelist": (lambda: LedgerRoster(e=4, slack=0.5), GSHARD),
    "top2-renormalized-after-drops": (lambda: LedgerLayer(e=4, slack=0.5, renorm="after", kind="swiglu", bias=False),
                                      {**GSHARD, "renormalize": False, "renormalize_kept": True}),
    "switch-top1": (lambda: LedgerLayer(e=4, picks=1, slack=1.0, floor=2, renorm="none", kind="gelu", bias=False),
                    {**GSHARD, "top_k": 1, "renormalize": False, "factor": 1.0, "min_capacity": 2}),
    "st-moe-top3-zloss": (lambda: LedgerLayer(e=8, picks=3, slack=0.75, renorm="none", kind="swiglu", bias=False,
                                              zeta=1e-3),
                          {**GSHARD, "top_k": 3, "renormalize": False, "factor": 0.75, "z": 1e-3}),
}


@pytest.mark.parametrize("style", sorted(MASK_STYLES))
def test_dispatch_mask_family_is_lifted_and_equal(style):
    make, want = MASK_STYLES[style]
    torch.manual_seed(0)
    eager = make()
    fast = moecompile.optimize(eager, (torch.randn(2, 8, 32),))
    (layer,) = moecompile.explain(fast).moe_layers
    assert layer.rewritten, layer.reason
    s = layer.spec
    facts = {**vars(s.route), **vars(s.capacity), **vars(s.aux)}
    assert {key: facts[key] for key in want} == want
    outputs = ("out", "aux", "counts") if getattr(eager, "tally", False) else ("out", "aux")
    assert (s.capacity.order, s.capacity.dropped, s.outputs) == ("choice", "zero", outputs)
    assert "1 rewritten" in str(moecompile.explain(fast))
    for shape in [(2, 8, 32), (3, 5, 32), (1, 40, 32), (2, 1, 32)]:  # capacities 4..20 by the block's rule
        assert_same_step_and_aux(eager, fast, torch.randn(shape))
    fast(torch.randn(1, 40, 32))
    assert s.drops.last_dropped > 0  # the capacity was binding: drops are part of what was compared


@pytest.mark.parametrize("grouped,slack,rule", [
    (False, 0.5, "capacity max(8, ⌈2·0.5·G/4⌉) for G tokens per call, first choices before later ones"),
    (True, 1.0, "capacity max(8, ⌈2·1·G/4⌉) for G tokens per sequence, first choices before later ones"),
])
def test_a_minimum_capacity_that_binds_at_every_recorded_size_is_read_as_the_rule(grouped, slack, rule):
    """max(8, ⌈2·slack·G/4⌉) is 8 at the recorded size (16 tokens, or sequences of 8), at twice it and at one
    token per sequence: a constant, as far as those show. A probe where the factor term exceeds the minimum
    reads the rule; the rewrite is equal where the factor binds (G = 80: 20 and 40 slots), and explain() shows
    the rule as read."""
    torch.manual_seed(0)
    eager = LedgerLayer(e=4, slack=slack, floor=8, grouped=grouped)
    fast = moecompile.optimize(eager, (torch.randn(2, 8, 32),))
    (layer,) = moecompile.explain(fast).moe_layers
    assert layer.rewritten, layer.reason
    c = layer.spec.capacity
    assert (c.capacity, c.factor, c.min_capacity, c.group) == (8, slack, 8, "sequence" if grouped else "call")
    assert f"renorm, {rule}, " in layer.details, layer.details
    assert_same_step_and_aux(eager, fast, torch.randn(1, 80, 32))
    assert f"{rule}; last call: capacity {round(2 * slack * 80 / 4)}, dropped " in layer.details, layer.details


@pytest.mark.parametrize("points,k,rule", [
    ({16: 10, 32: 20, 2: 4}, 2, (1.25, 4)),    # ⌈2·1.25·T/4⌉, at least 4
    ({16: 8, 32: 16, 2: 1}, 2, (1.0, 0)),      # ⌈2·T/4⌉
    ({6: 2, 12: 3, 1: 1}, 1, (1.0, 0)),        # ⌈T/4⌉ (1.1 would fit too: the simplest factor is taken)
    ({16: 5, 32: 5, 2: 5}, 2, (0.0, 0)),       # a constant
])
def test_capacity_rule_from_recorded_token_counts(points, k, rule):
    assert capacity_rule(points, k, 4) == rule
    with pytest.raises(Unsupported, match="by a rule other than"):
        capacity_rule({16: 10, 32: 11, 2: 4}, 2, 4)


@pytest.mark.parametrize("policy,reason", [
    (dict(later="random"), "whether a token's later choice or its slot is kept is random"),
    (dict(noise="gumbel"), "the second-expert choice is random"),
])
def test_random_policies_stay_original_with_a_reason(policy, reason):
    torch.manual_seed(0)
    eager = LedgerLayer(e=4, **policy)
    fast = moecompile.optimize(eager, (torch.randn(2, 8, 32),))
    (layer,) = moecompile.explain(fast).moe_layers
    assert not layer.rewritten
    assert reason in layer.reason and "in eval mode, or with a deterministic policy, the block can be lifted" in \
        layer.reason
    # read in eval mode, the block would still draw in training mode: refused too, not lifted for one mode
    fast = moecompile.optimize(eager.eval(), (torch.randn(2, 8, 32),))
    (layer,) = moecompile.explain(fast).moe_layers
    assert not layer.rewritten and "random in training mode" in layer.reason
    assert not re.search(r"_default|_tensor|_scalar", layer.reason)  # what was not understood, no graph node names


# ---- under expert parallelism ---------------------------------------------------------------------------------
def _expert_parallel_errors(rank, ws, styles):
    """Per style, the worst relative error of rank `rank` against one process (helpers.expert_parallel_check)."""
    return {style: max(expert_parallel_check(rank, ws, MASK_STYLES[style][0])[0].values()) for style in styles}


def test_dispatch_mask_family_under_expert_parallelism():
    from moecompile.runtime.spawn import run_ranks
    styles = ["gshard-top2", "gshard-top2-modulelist"]
    for rank_errors in run_ranks(_expert_parallel_errors, 2, styles):
        for style in styles:
            assert rank_errors[style] < 1e-5, (style, rank_errors[style])
