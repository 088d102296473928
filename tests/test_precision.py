"""Each stage of a block (router, experts, combine) runs in the precision the original computes it in, read
from its casts: hand-written fp32 blocks that run one stage in bf16 (tests/zoo.py SortedBank) are lifted and
equal to the original, and the same lift with the cast dropped fails validation (the float64 second opinion
rounds where the original does). optimize(precision="model") is the explicit way to run those stages in the
model's precision instead. Under expert parallelism, a block with bf16 experts and one with a load counter
give the single process's results."""
import copy
import dataclasses
import functools

import pytest
import torch

import moecompile
from moecompile.runtime.spawn import run_ranks
from moecompile.validation import _run_in_float64, compare, max_relative_error
from tests.helpers import assert_same_training_step, expert_parallel_check
from tests.mask_zoo import LedgerLayer
from tests.zoo import Net, SortedBank

BF16 = torch.bfloat16
STAGES = {"router": ("router",), "combine": ("combine",), "all": ("router", "experts", "combine")}


def _x(seed=0, shape=(2, 8, 32)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _stage_dtypes(spec):
    return {"router": spec.route.dtype, "experts": spec.expert.dtype, "combine": spec.combine_dtype}


@pytest.mark.parametrize("stages", sorted(STAGES))
def test_stages_run_in_the_precision_the_block_casts_them_to(stages):
    torch.manual_seed(0)
    model = Net(SortedBank(narrow=BF16, stages=STAGES[stages]))
    fast = moecompile.optimize(model, (_x(),))
    [layer] = moecompile.explain(fast).moe_layers
    assert layer.rewritten, layer.reason
    want = {stage: BF16 if stage in STAGES[stages] else None for stage in ("router", "experts", "combine")}
    assert _stage_dtypes(layer.spec) == want
    for stage in STAGES[stages]:
        assert f"{stage} in bfloat16" in layer.details
    for x in (_x(1), _x(2, (3, 5, 32)), _x(3, (1, 1, 32))):
        assert_same_training_step(model, fast, (x,), {})


@pytest.mark.parametrize("grouped", [False, True])
def test_a_combine_einsum_in_bf16_rounds_each_sum_once(grouped):
    """GShard's combine as an einsum of the combine weights with the experts' outputs, both cast to bf16: a
    matmul, which sums in fp32 and rounds each token's sum once (not each product). Lifted and equal; with
    the dtype dropped, validation refuses it."""
    torch.manual_seed(0)
    block = LedgerLayer(grouped=grouped, narrow=BF16)
    fast = moecompile.optimize(block, (_x(),))
    [layer] = moecompile.explain(fast).moe_layers
    assert layer.rewritten, layer.reason
    assert layer.spec.combine_dtype == BF16 and layer.spec.combine_sums_once
    for x in (_x(1), _x(2, (3, 5, 32))):
        assert_same_training_step(block, fast, (x,), {})
    original = type(block).forward.__get__(block)
    layer.spec.combine_dtype = None
    err, label, rejudged = compare(block, original, fast.forward, _x(1), (), {}, seed=0)
    assert err > 1e-3 and rejudged == 0, (err, label)


@pytest.mark.parametrize("stage", ["router", "combine"])
def test_a_lift_that_drops_a_stage_cast_fails_validation(stage):
    """The lifted block with the stage's dtype taken out of its spec is what a lift that ignores the cast
    computes: it differs from the original by bf16 rounding, and the float64 evaluation, which rounds where the
    original does, does not excuse it."""
    torch.manual_seed(0)
    block = SortedBank(narrow=BF16, stages=(stage,))
    fast = moecompile.optimize(block, (_x(),))
    [layer] = moecompile.explain(fast).moe_layers
    assert layer.rewritten, layer.reason
    original = type(block).forward.__get__(block)
    assert compare(block, original, fast.forward, _x(1), (), {}, seed=0)[0] == 0.0  # (after fp32 rounding's excuse)
    if stage == "router":
        layer.spec.route = dataclasses.replace(layer.spec.route, dtype=None)
    else:
        layer.spec.combine_dtype = None
    err, label, rejudged = compare(block, original, fast.forward, _x(1), (), {}, seed=0)
    assert err > 1e-3 and rejudged == 0, (err, label)


def test_model_precision_is_an_explicit_option():
    """precision="model": the stages the block casts down run in fp32, which explain() says, and validation
    accepts the original's bf16 rounding, saying why. The rewrite is then closer to exact arithmetic (the
    block without its casts, in float64) than the original is."""
    torch.manual_seed(0)
    model = Net(SortedBank(narrow=BF16, stages=STAGES["all"]))
    fast = moecompile.optimize(model, (_x(),), precision="model")
    [layer] = moecompile.explain(fast).moe_layers
    assert layer.rewritten, layer.reason
    assert _stage_dtypes(layer.spec) == dict.fromkeys(("router", "experts", "combine"))
    assert layer.spec.raised_stages == (("router", BF16), ("experts", BF16), ("combine", BF16))
    assert "experts in the model's precision, not the original's bfloat16 (precision='model')" in layer.details
    assert ("validated (within 3.1e-02: the original rounds its router, experts, combine to bfloat16, the "
            "rewrite does not, precision='model')") in " ".join(layer.spec.notes)
    exact = copy.deepcopy(model)
    exact.block.narrow = None
    x = _x(1)
    truth = dict(_run_in_float64(exact, x, (), {}, seed=0, grads=False))["output 0"]
    with torch.no_grad():
        got, want = fast(x), model(x)
    assert max_relative_error(got, want, want) > 1e-4  # not the original's rounding...
    assert (got.double() - truth).abs().max() < (want.double() - truth).abs().max() / 4  # ...but finer
    with pytest.raises(ValueError, match="precision='fp32'; expected 'original' or 'model'"):
        moecompile.optimize(model, precision="fp32")


EP_BLOCKS = {"bf16 experts": functools.partial(SortedBank, narrow=BF16),
             "bf16 router and combine": functools.partial(SortedBank, narrow=BF16, stages=("router", "combine")),
             "load counter": functools.partial(SortedBank, tally=True),
             "bf16 experts and load counter": functools.partial(SortedBank, narrow=BF16, tally=True)}


def _expert_parallel_cases(rank, ws):
    return {name: expert_parallel_check(rank, ws, make) for name, make in EP_BLOCKS.items()}


def test_reduced_precision_and_load_counter_under_expert_parallelism():
    """Each rank's output and gradients equal one process's; each rank counts the tokens it routed, as the
    original on that rank would, and the counts summed over the ranks are one process's over every batch.
    bf16 experts' weight gradients are equal within bf16 rounding: one process rounds each rank's gradient to
    bf16 and sums them in fp32, an expert's rank rounds the gradient of all the rows it received once."""
    for rank_results in run_ranks(_expert_parallel_cases, 2):
        for name, (errors, buffers) in rank_results.items():
            for label, err in errors.items():
                rounded = "bf16 experts" in name and label in ("gradient of up", "gradient of down")
                assert err < (torch.finfo(BF16).eps if rounded else 1e-5), (name, label, err)
            assert buffers == ({"seen": (True, True)} if "counter" in name else {}), (name, buffers)
