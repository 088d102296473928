"""Tutel's dynamic capacity (optimize(capacity_factor=)), batch-prioritized routing, dynamic top-k
(set_routing) and drop accounting: each rule against hand counts, the kernels against the reference, top-k
against eager models built with that k, and the capacity agreed over 2 expert-parallel ranks."""
import math
import types

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

import moecompile
from moecompile.ir import ops
from moecompile.ir.lowering import call_capacity, capacity_rows
from moecompile.ir.spec import CapacitySpec, RoutingOverride
from moecompile.kernels import native
from moecompile.kernels import reference as ref
from moecompile.models import gpt_moe
from moecompile.runtime.expert_parallel import reduce_gradients
from moecompile.validation import max_relative_error
from moecompile.runtime.spawn import run_ranks
from tests.helpers import assert_same_training_step
from tests.zoo import BiasedBank, LoopBank, Net

BACKENDS = ["native", "reference", pytest.param("triton", marks=pytest.mark.interpreter)]
# T = 8 tokens, top-2 of E = 4 experts. Per expert over all 8 tokens: 7, 4, 3, 2 slots; in groups of 4
# tokens: [4, 2, 1, 1] and [3, 2, 2, 1]
INDICES = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 3], [1, 0], [2, 0], [0, 1], [3, 2]])


@pytest.mark.parametrize("factor,group_size,capacity,dropped", [
    (1.0, 0, 4, 3),      # ⌈2·1·8/4⌉ = 4: expert 0 drops 7 − 4
    (1.25, 0, 5, 2),     # ⌈2·1.25·8/4⌉ = 5
    (0.0, 0, 7, 0),      # the largest load: nothing dropped
    (-0.5, 0, 2, 8),     # min(7, ⌈2·0.5·8/4⌉ = 2): 5 + 2 + 1 + 0 dropped
    (-10.0, 0, 7, 0),    # the cap does not bind
    (1.0, 4, 2, 3),      # per group of 4: ⌈2·1·4/4⌉ = 2; (4 − 2) + (3 − 2)
    (0.0, 4, 4, 0),      # the largest load of any group
    (-0.5, 4, 1, 8),     # min(4, ⌈2·0.5·4/4⌉ = 1): 3 + 1 + 0 + 0 and 2 + 1 + 1 + 0
    (None, 4, 3, 1),     # no factor: the block's own capacity (3 per group of 4): expert 0 of group 0
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_rule_and_drops_by_hand(factor, group_size, capacity, dropped, backend):
    own = CapacitySpec(3, group_size) if group_size else None
    spec = types.SimpleNamespace(capacity=own, routing=RoutingOverride(factor), num_experts=4, parallel=None)
    cap = call_capacity(spec, INDICES)
    assert (cap.capacity, cap.group_size) == (capacity, group_size)
    x = torch.randn(8, 3)
    x_perm, order, counts = ops.dispatch(x, INDICES, 4, cap.capacity, cap.group_size, None, backend)
    assert INDICES.numel() - x_perm.shape[0] == dropped == INDICES.numel() - int(counts.sum())


def test_a_capacity_per_sequence_groups_each_call_by_its_sequence_length():
    """The block's own groups are each sequence of the call's hidden states [..., S, D], not a token count:
    the same 8 tokens as 2 sequences of 4, or 8 of 1; a capacity factor then applies per group of S."""
    own = CapacitySpec(3, group="sequence")
    spec = types.SimpleNamespace(capacity=own, routing=RoutingOverride(), num_experts=4, parallel=None)
    assert call_capacity(spec, INDICES, (2, 4, 3)) == CapacitySpec(3, 4) == own.for_input((2, 4, 3))
    assert call_capacity(spec, INDICES, (8, 1, 3)) == CapacitySpec(3, 1)
    spec.routing = RoutingOverride(1.0)
    assert call_capacity(spec, INDICES, (2, 4, 3)) == CapacitySpec(2, 4)  # ⌈2·1·4/4⌉ per sequence of 4
    with pytest.raises(ValueError, match="per sequence needs the hidden states' shape"):
        call_capacity(spec, INDICES)
    assert capacity_rows(own.for_input((2, 4, 3)), 8) == 6 and capacity_rows(own, 8) == 8  # unknown S: a bound
    with pytest.raises(ValueError, match="group_size"):
        CapacitySpec(3, 4, group="sequence")


def test_capacity_is_exact_for_decimal_factors():
    """1.1 · 10 tokens is 11 slots, although 1.1 · 10 is 11.000000000000002 in floating point."""
    spec = types.SimpleNamespace(capacity=None, routing=RoutingOverride(1.1), num_experts=1, parallel=None)
    assert call_capacity(spec, torch.zeros(10, 1, dtype=torch.int64)).capacity == 11


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_prioritized_dispatch_keeps_the_most_important_tokens(backend):
    x = torch.arange(6.0).unsqueeze(1)
    idx = torch.tensor([[0], [0], [0], [1], [0], [0]])
    priority = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2, 0.5])
    # capacity 2 over all tokens: expert 0 keeps tokens 1 (0.9) and 5 (0.5), listed in token order
    x_perm, order, counts = ops.dispatch(x, idx, 2, 2, 0, priority, backend)
    assert order.tolist() == [1, 5, 3] and counts.tolist() == [2, 1] and x_perm.squeeze(1).tolist() == [1, 5, 3]
    # capacity 1 per group of 3: token 1 of tokens 0..2, token 5 of 4..5 (0.5 > 0.2)
    _, order, counts = ops.dispatch(x, idx, 2, 1, 3, priority, backend)
    assert order.tolist() == [1, 5, 3] and counts.tolist() == [2, 1]
    # without priority, first come first served: tokens 0, 1 and 0, 4
    assert ops.dispatch(x, idx, 2, 2, 0, None, backend)[1].tolist() == [0, 1, 3]
    assert ops.dispatch(x, idx, 2, 1, 3, None, backend)[1].tolist() == [0, 4, 3]
    # top-2: tokens by priority 1, 3, then the tie 0, 2 in token order; a token's slots in slot order
    idx2 = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]])
    _, order, counts = ops.dispatch(torch.randn(4, 2), idx2, 2, 1, 0, torch.tensor([0.2, 0.9, 0.2, 0.5]), backend)
    assert order.tolist() == [3, 2] and counts.tolist() == [1, 1]  # token 1's second and first slot


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_prioritized_dispatch(backend):
    g = torch.Generator().manual_seed(0)
    x, idx = torch.randn(6, 4, generator=g, requires_grad=True), torch.randint(0, 3, (6, 2), generator=g)
    # a capacity makes N data-dependent: the AOT-dispatch checks cannot run it (tests/test_ops.py)
    torch.library.opcheck(ops.dispatch, (x, idx, 3, 2, 0, torch.rand(6, generator=g), backend),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("T,k,E,capacity,group_size", [(1024, 2, 8, 200, 0), (2048, 1, 4, 50, 256)])
def test_native_prioritized_dispatch_by_sorting_matches_reference(T, k, E, capacity, group_size):
    g = torch.Generator().manual_seed(T)
    idx, x = torch.randint(0, E, (T, k), generator=g), torch.randn(T, 4, generator=g)
    priority = torch.rand(T, generator=g)
    got = native.dispatch(x, idx, E, capacity, group_size, priority)
    want = ref.dispatch(x, idx, E, capacity, group_size, priority)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not torch.equal(got[1], ref.dispatch(x, idx, E, capacity, group_size)[1])  # priority mattered


def _manual_block(bank, h, capacity, prioritized):
    """LoopBank's output with a capacity, written out slot by slot: token order (or priority order), each
    expert keeping its first `capacity` slots. → (out [T, D], dropped slots)."""
    probs = bank.scorer(h).softmax(-1)                                          # [T, E]
    w, idx = probs.topk(bank.k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    tokens = probs.amax(-1).argsort(descending=True, stable=True).tolist() if prioritized else range(len(h))
    taken, out, dropped = [0] * probs.shape[1], torch.zeros_like(h), 0
    for t in tokens:
        for j in range(bank.k):
            e = int(idx[t, j])
            if taken[e] < capacity:
                taken[e] += 1
                out[t] += w[t, j] * bank.workers[e](h[t])
            else:
                dropped += 1
    return out, dropped


@pytest.mark.parametrize("factor,prioritized", [(0.5, False), (0.5, True), (-0.75, True), (0.0, False)])
def test_block_drops_and_output_match_a_hand_count(factor, prioritized):
    torch.manual_seed(0)
    model = Net(LoopBank())
    x = torch.randn(2, 8, 32)
    fast = moecompile.optimize(model, (x,), capacity_factor=factor, batch_prioritized=prioritized)
    (layer,) = moecompile.explain(fast).moe_layers
    assert layer.rewritten, layer.reason
    assert any("against the reference kernels" in n for n in layer.spec.notes)
    h = model.inp(x).reshape(16, 32)
    load = torch.bincount(model.block.scorer(h).topk(2, -1).indices.flatten(), minlength=4).max().item()
    bound = math.ceil(2 * abs(factor) * 16 / 4)                     # ⌈k·|x|·G/E⌉, G = all 16 tokens
    capacity = bound if factor > 0 else load if factor == 0 else min(load, bound)
    want, dropped = _manual_block(model.block, h, capacity, prioritized)
    assert (dropped > 0) == (factor != 0.0)
    torch.testing.assert_close(fast.block(h.view(2, 8, 32)).view(16, 32), want, rtol=1e-5, atol=1e-5)
    drops = layer.spec.drops
    assert (drops.last_capacity, drops.last_dropped, drops.last_routed) == (capacity, dropped, 32)
    assert (drops.routed, drops.dropped) == (32, dropped)        # that call ran with gradients enabled
    fast(x)
    with torch.no_grad():
        fast(x)                                                  # not training: only "last call" changes
    assert (drops.routed, drops.dropped, drops.last_dropped) == (64, 2 * dropped, dropped)
    assert f"dropped {dropped} of 32 token-slots; training: dropped {2 * dropped} of 64" in layer.details


@pytest.mark.parametrize("factor,prioritized", [(1.0, False), (0.5, True), (0.0, False), (-0.5, True)])
def test_outputs_and_gradients_equal_the_reference_kernels(factor, prioritized):
    """1024 slots per call: native's sort-based capacity dispatch, not its small-size fallback."""
    torch.manual_seed(0)
    model = gpt_moe(n_layer=2, d_model=32, d_ff=64, max_seq=128)
    idx = torch.randint(0, 256, (4, 128))
    options = dict(capacity_factor=factor, batch_prioritized=prioritized, validate=False)
    want = moecompile.optimize(model, (idx,), kernels="reference", **options)
    fast = moecompile.optimize(model, (idx,), kernels="native", **options)
    assert_same_training_step(want, fast, (idx, idx), {})
    drops = [moecompile.explain(m).moe_layers[0].spec.drops for m in (want, fast)]
    assert drops[0] == drops[1] and drops[0].routed == 1024 and (drops[0].dropped > 0) == (factor != 0.0)


@pytest.mark.parametrize("bank,compiled_k,k", [(LoopBank, 2, 3), (LoopBank, 2, 4), (BiasedBank, 1, 2)])
def test_dynamic_top_k_equals_an_eager_model_built_with_that_k(bank, compiled_k, k):
    """LoopBank: softmax top-k renormalized over SwiGLU experts (Mixtral's routing); BiasedBank: top-1 with
    the raw probability as weight (Switch's) and a gated shared expert, run top-2 unnormalized."""
    torch.manual_seed(0)
    model = Net(bank(k=compiled_k))
    x = torch.randn(2, 8, 32)
    fast = moecompile.optimize(model, (x,))
    moecompile.set_routing(fast, top_k=k)        # no recompilation: the next call routes top-k
    model.block.k = k                            # the eager model, same Parameters, built for k
    assert_same_training_step(model, fast, (x,), {})
    assert moecompile.explain(fast).moe_layers[0].top_k == k
    moecompile.set_routing(fast, capacity_factor=0)  # dropless capacity: still equal, at any k
    assert_same_training_step(model, fast, (x,), {})
    assert moecompile.explain(fast).moe_layers[0].spec.drops.last_routed == 16 * k


def test_dynamic_top_k_of_a_hugging_face_mixtral_block():
    """Transformers' MixtralSparseMoeBlock (stacked experts, grouped_mm): its router reads `top_k` per call."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    cfg = MixtralConfig(hidden_size=32, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(cfg)
    for p in block.parameters():  # created with torch.empty
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(1, 16, 32)
    fast = moecompile.optimize(block, (x,))
    moecompile.set_routing(fast, top_k=3)
    block.gate.top_k = 3
    assert_same_training_step(block, fast, (x,), {})


def test_dynamic_top_k_of_gpt_moe_and_back():
    torch.manual_seed(0)
    model = gpt_moe(n_layer=2, d_model=32, d_ff=64)
    idx = torch.randint(0, 256, (2, 16))
    fast = moecompile.optimize(model, (idx,))
    for k in (3, 2):
        moecompile.set_routing(fast, top_k=k)
        model.blocks[1].ffn.top_k = k
        assert_same_training_step(model, fast, (idx, idx), {})


def test_set_routing_changes_and_restores_the_capacity():
    torch.manual_seed(0)
    model = Net(LoopBank())
    x = torch.randn(2, 8, 32)
    fast = moecompile.optimize(model, (x,))
    moecompile.set_routing(fast, capacity_factor=0.5, batch_prioritized=True)
    spec = moecompile.explain(fast).moe_layers[0].spec
    assert spec.routing == RoutingOverride(0.5, True) and not torch.allclose(fast(x), model(x))
    assert spec.drops.last_capacity == 4 and spec.drops.last_dropped > 0
    moecompile.set_routing(fast, capacity_factor=None)  # the block's own: dropless again
    torch.testing.assert_close(fast(x), model(x))


def test_switch_keeps_its_capacity_groups_under_a_capacity_factor():
    """Hugging Face Switch Transformers: a capacity factor replaces its expert_capacity=4 per sequence,
    in the same groups; validation proved the native kernels equal the reference ones with it."""
    from tests.hf_zoo import inputs, switch
    torch.manual_seed(0)
    model = switch()
    args, kwargs = inputs("switch")
    fast = moecompile.optimize(model, args, kwargs, capacity_factor=0.5, batch_prioritized=True)
    layers = moecompile.explain(fast).moe_layers
    assert len(layers) == 2 and all(layer.rewritten for layer in layers), [layer.reason for layer in layers]
    assert all(any("options (capacity_factor=0.5, batch_prioritized=True) against the reference kernels" in n
                   for n in layer.spec.notes) for layer in layers)
    fast(*args, **kwargs).loss.backward()
    for layer in layers:  # groups of one sequence (12 encoder, 7 decoder tokens), top-1 of 4 experts
        G = 12 if "encoder" in layer.name else 7
        assert layer.spec.drops.last_capacity == math.ceil(0.5 * G / 4) and layer.spec.drops.last_dropped > 0
        assert layer.spec.capacity == CapacitySpec(4, group="sequence")  # its own, kept for capacity_factor=None
        assert "capacity factor 0.5 (C = ⌈k·0.5·G/E⌉) per sequence, batch-prioritized" in layer.details
    block = fast.get_submodule(layers[0].name)  # another sequence length: groups of its 24 tokens
    block(torch.randn(1, 24, 32))
    assert layers[0].spec.drops.last_capacity == math.ceil(0.5 * 24 / 4)


def test_a_capacity_factor_keeps_dropped_tokens_passing_unchanged():
    """A block whose dropped tokens pass unchanged (`dropped="identity"`) keeps that under the factor:
    top-1 renormalized (weight 1), so a dropped token's output is its input."""
    torch.manual_seed(0)
    model = Net(LoopBank(k=1))
    x = torch.randn(2, 8, 32)
    fast = moecompile.optimize(model, (x,), capacity_factor=0.5, validate=False)
    layer = moecompile.explain(fast).moe_layers[0]
    layer.spec.capacity = CapacitySpec(3, dropped="identity")  # as Switch Transformers v4 drops
    h = model.inp(x).reshape(16, 32)
    out = fast.block(h.view(2, 8, 32)).view(16, 32)
    first = model.block.scorer(h).argmax(-1)                           # [T] each token's expert
    dropped = [t for t in range(16) if int((first[:t] == first[t]).sum()) >= 2]  # C = ⌈0.5·16/4⌉ = 2
    assert dropped and layer.spec.drops.last_dropped == len(dropped)
    torch.testing.assert_close(out[dropped], h[dropped])
    kept = [t for t in range(16) if t not in dropped]
    torch.testing.assert_close(out[kept], _manual_block(model.block, h, 2, False)[0][kept])


def test_dynamic_capacity_traces():
    """The capacity of a step is data-dependent (x ≤ 0): export and Dynamo keep it in one graph."""
    torch.manual_seed(0)
    model = gpt_moe(n_layer=2, d_model=32, d_ff=64)
    idx = torch.randint(0, 256, (2, 8))
    fast = moecompile.optimize(model, (idx,), capacity_factor=-0.5, batch_prioritized=True)
    exported = torch.export.export(fast, (idx,))
    assert [str(n.target) for n in exported.graph.nodes if "moecompile" in str(n.target)] == [
        f"moecompile.{op}.default" for op in ("route", "dispatch", "expert_ffn", "combine")]
    torch.testing.assert_close(exported.module()(idx)[0], fast(idx)[0])
    assert_same_training_step(fast, torch.compile(fast, backend="aot_eager", fullgraph=True), (idx, idx), {})


def test_bad_routing_arguments_are_clear_errors():
    model = Net(LoopBank())
    x = torch.randn(2, 8, 32)
    for bad in (float("nan"), float("inf"), True, "1.0", [1.0]):
        with pytest.raises(ValueError, match="capacity_factor="):
            moecompile.optimize(model, (x,), capacity_factor=bad)
    with pytest.raises(ValueError, match="batch_prioritized="):
        moecompile.optimize(model, (x,), batch_prioritized=1)
    with pytest.raises(ValueError, match="has compiled"):
        moecompile.set_routing(moecompile.optimize(model), top_k=1)
    with pytest.raises(ValueError, match="has compiled"):
        moecompile.set_routing(model, top_k=1)
    fast = moecompile.optimize(model, (x,))
    for bad in (0, 5, True, 1.5):
        with pytest.raises(ValueError, match=r"expected an int in \[1, 4\]"):
            moecompile.set_routing(fast, top_k=bad)
    with pytest.raises(ValueError, match="capacity_factor=nan"):
        moecompile.set_routing(fast, capacity_factor=float("nan"))
    assert moecompile.explain(fast).moe_layers[0].top_k == 2  # nothing changed by a refused call


def test_validation_compares_the_options_with_the_reference_kernels(monkeypatch):
    """A dispatch that ignores the slot priority computes another function: check (2) must catch it."""
    real = native.dispatch
    monkeypatch.setattr(native, "dispatch", lambda x, i, E, c, g, priority=None: real(x, i, E, c, g))
    torch.manual_seed(0)
    fast = moecompile.optimize(Net(LoopBank()), (torch.randn(2, 8, 32),), capacity_factor=0.5, batch_prioritized=True)
    (layer,) = moecompile.explain(fast).moe_layers
    assert not layer.rewritten
    assert "translation validation of the routing options (capacity_factor=0.5, batch_prioritized=True)" in layer.reason


# ---- expert parallelism: 2 gloo ranks against one process --------------------------------------------------
FACTORS = (0.0, -0.5)
B, S = 2, 12  # per rank


def _model():
    torch.manual_seed(0)
    return gpt_moe(n_layer=2, d_model=32, d_ff=64, n_head=4, max_seq=16)


def _ids(ranks):
    return torch.randint(1, 256, (B * ranks, S), generator=torch.Generator().manual_seed(7))


def _loss(logits):
    return (logits * torch.randn(logits.shape[-1], generator=torch.Generator().manual_seed(3))).mean()


def _ep_rank(rank, ws):
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("ep",))
    ids = _ids(ws).chunk(ws)[rank]
    results = {}
    for factor in FACTORS:
        fast = moecompile.optimize(_model(), (ids,), mesh=mesh, capacity_factor=factor)
        logits, _ = fast(ids)
        _loss(logits).backward()
        reduce_gradients(fast, mesh)
        (layer,) = moecompile.explain(fast).moe_layers
        results[factor] = (logits.detach(), {n: p.grad for n, p in fast.named_parameters()}, layer.spec.drops)
    return results


def test_dynamic_capacity_under_expert_parallelism_equals_one_process():
    """Each rank's tokens are one capacity group; the ranks agree on C (all-reduce MAX), which one process
    reproduces with group_size = tokens per rank."""
    ranks = run_ranks(_ep_rank, 2)
    ids = _ids(2)
    for factor in FACTORS:
        one = moecompile.optimize(_model(), (ids,), capacity_factor=factor)
        (layer,) = moecompile.explain(one).moe_layers
        layer.spec.capacity = CapacitySpec(0, group_size=B * S)  # the groups only: the factor sets C
        logits, _ = one(ids)
        _loss(logits).backward()
        grads = dict(one.named_parameters())
        for r, results in enumerate(ranks):
            got_logits, got_grads, drops = results[factor]
            assert max_relative_error(got_logits, logits.chunk(2)[r].detach(), got_logits) < 1e-5
            for n, g in got_grads.items():
                assert max_relative_error(g, grads[n].grad, g) < 1e-5, n
            assert drops.last_capacity == layer.spec.drops.last_capacity  # agreed: the largest over ranks
        assert sum(res[factor][2].last_dropped for res in ranks) == layer.spec.drops.last_dropped
        assert (layer.spec.drops.last_dropped > 0) == (factor < 0)
