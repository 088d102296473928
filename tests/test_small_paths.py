"""The small-size paths: the expert FFN visiting only experts that got rows, and the batched forms
(kernels/batched.py decode_ffn and stacked_ffn, chosen per call by lowering.batched_path). Each must give the
reference's outputs and gradients at 0, 1, k, E and many tokens, and the choice between the paths must not
change results beyond fp32 rounding. No timings here (benchmarks/small.py)."""
import pytest
import torch

import moecompile
from moecompile.ir import fast_path, lowering
from moecompile.kernels import bagged, batched, native, onednn, padded
from moecompile.kernels import reference as ref

ROLES = ("w1", "w2", "w3", "b1", "b2", "b3")


def expert_weights(E, D, F, fused, bias, gen):
    """Stacked [E, ...] expert weights in nn.Linear layout, leaves requiring grad (absent roles: None)."""
    mk = lambda *s: (torch.randn(*s, generator=gen) * 0.3).requires_grad_()  # noqa: E731
    F1 = 2 * F if fused else F
    return {"w1": mk(E, F1, D), "w2": mk(E, D, F), "w3": None if fused else mk(E, F, D),
            "b1": mk(E, F1) if bias else None, "b2": mk(E, D) if bias else None,
            "b3": mk(E, F) if bias and not fused else None}


def reference_moe(x, weights, indices, w, E, activation, fused):
    """dispatch → expert_ffn → combine on the reference kernels: the definition."""
    x_perm, order, counts = ref.dispatch(x, indices, E, -1, 0)
    lists = {r: None if t is None else [t] for r, t in w.items()}
    y = ref.expert_ffn(x_perm, counts, *(lists[r] for r in ROLES), activation, fused, 1.702, 7.0)
    return ref.combine(y, order, weights, None)


def grads_of(out, leaves, seed=1):
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, leaves, cot, allow_unused=True)


def close(a, b, rtol=2e-5):
    """Equal up to fp32 rounding, relative to b's largest value; a missing gradient equals a zero one."""
    if a is None or b is None:
        return not any(t is not None and t.abs().any() for t in (a, b))
    if a.shape != b.shape:
        return False
    return a.numel() == 0 or (a - b).abs().max().item() <= rtol * max(b.abs().max().item(), 1e-6)


E_, K_ = 16, 4
SIZES = [0, 1, K_, E_, 64]  # tokens: none, one (decode), k, E, many (prefill)
KINDS = [("swiglu", "halves", False), ("swiglu", "", True), ("swiglu", "", False), ("gelu", "", False),
         ("clamped_swiglu", "interleaved", True)]


@pytest.mark.parametrize("T", SIZES)
@pytest.mark.parametrize("activation,fused,bias", KINDS)
@pytest.mark.parametrize("form", ["decode", "stacked"])
def test_batched_forms_match_reference(T, activation, fused, bias, form):
    """decode_ffn's and stacked_ffn's output and, by autograd, their gradients (input, routing weights,
    every expert weight)."""
    gen = torch.Generator().manual_seed(T)
    D, F = 8, 6
    fused = fused if activation in ("swiglu", "clamped_swiglu") else ""
    w = expert_weights(E_, D, F, fused, bias, gen)
    if activation == "gelu":
        w["w3"], w["b3"] = None, None
    x = torch.randn(T, D, generator=gen).requires_grad_()
    weights = torch.rand(T, K_, generator=gen).requires_grad_()
    indices = torch.rand(T, E_, generator=gen).topk(K_, -1).indices
    leaves = [x, weights] + [t for t in w.values() if t is not None]
    stacked = [[t] if t is not None else None for t in w.values()]
    if form == "decode":
        got = batched.decode_ffn(x, weights, indices, *stacked, activation, fused, 1.702, 7.0)
    else:
        counts = torch.bincount(indices.flatten(), minlength=E_)
        got = batched.stacked_ffn(x, weights, indices, counts, *stacked, activation, fused, 1.702, 7.0)
    want = reference_moe(x, weights, indices, w, E_, activation, fused)
    assert got.shape == (T, D) and close(got, want)
    for g, r in zip(grads_of(got, leaves), grads_of(want, leaves)):
        assert close(g, r)


@pytest.mark.parametrize("T", SIZES)
@pytest.mark.parametrize("save", [True, False])
@pytest.mark.parametrize("activation,fused,bias", KINDS)
def test_expert_ffn_visits_only_live_experts(T, save, activation, fused, bias):
    """native expert_ffn with most experts empty (and none at all at T = 0): the reference's outputs, and
    its gradients (experts without rows get exactly zero)."""
    gen = torch.Generator().manual_seed(T + 100)
    D, F = 8, 6
    fused = fused if activation in ("swiglu", "clamped_swiglu") else ""
    w = expert_weights(E_, D, F, fused, bias, gen)
    if activation == "gelu":
        w["w3"], w["b3"] = None, None
    indices = torch.rand(T, E_, generator=gen).topk(K_, -1).indices
    x = torch.randn(T, D, generator=gen)
    x_perm, _, counts = ref.dispatch(x, indices, E_, -1, 0)
    x_perm.requires_grad_()
    lists = {r: None if t is None else [t] for r, t in w.items()}
    args = (*(lists[r] for r in ROLES), activation, fused, 1.702, 7.0)
    want = ref.expert_ffn(x_perm, counts, *args)
    plain = [None if t is None else [t.detach()] for t in (w[r] for r in ROLES)]  # as the op gets them
    y, *saved = native.expert_ffn_forward(x_perm.detach(), counts, *plain, *args[6:], save=save)
    assert close(y, want)
    if not save:
        assert all(t.shape[0] == 0 for t in saved)
        return
    grad_y = torch.randn(y.shape, generator=gen)
    grad_x, grads = native.expert_ffn_backward(grad_y, x_perm.detach(), counts, saved, *plain, *args[6:])
    leaves = [x_perm] + [w[r] for r in ROLES if w[r] is not None]
    expected = torch.autograd.grad(want, leaves, grad_y, allow_unused=True)
    assert close(grad_x, expected[0])
    for r, e in zip([r for r in ROLES if w[r] is not None], expected[1:]):
        assert close(grads[r], e), r
    idle = counts == 0
    if idle.any():
        assert not grads["w1"][idle].any() and not grads["w2"][idle].any()


def qwen3_block(k=K_):
    """A fine-grained Qwen3-MoE block (16 experts, top-4: stacked weights) from a 1-layer model."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=E_, num_experts_per_tok=k, norm_topk_prob=True, decoder_sparse_step=1,
                         mlp_only_layers=[], max_position_embeddings=64)
    return Qwen3MoeForCausalLM(cfg).model.layers[0].mlp


@pytest.fixture(scope="module")
def lifted():
    block = qwen3_block()
    fast = moecompile.optimize(block, example_inputs=(torch.randn(2, 8, 32),))
    layer = moecompile.explain(fast).moe_layers[0]
    assert layer.rewritten, layer.reason
    return block, fast, layer.spec


def test_select_kernels_enables_decode_for_fine_grained_experts(lifted):
    _, _, spec = lifted
    assert 0 < spec.decode_slots <= E_ // 4


def test_select_kernels_allows_the_stacked_form_for_stacked_native_experts(lifted):
    assert lifted[2].stacked_path


FORMS = {"canonical": lambda spec, indices, *_: (None, None),
         "decode": lambda spec, indices, *_: ("decode", None),
         "stacked": lambda spec, indices, *_: ("stacked", torch.bincount(indices.flatten(), minlength=spec.num_experts))}


@pytest.mark.parametrize("T", SIZES)
@pytest.mark.parametrize("training", [False, True])
def test_paths_agree_with_original_and_each_other(lifted, T, training, monkeypatch):
    """The optimized block with each path forced (the canonical ops, decode_ffn, stacked_ffn): each equal
    to the original (outputs; input and weight gradients in training), and to each other within fp32
    rounding."""
    block, fast, spec = lifted
    x = torch.randn(1, T, 32, generator=torch.Generator().manual_seed(T))
    params = [p for p in block.parameters() if p.requires_grad]

    def run(module):
        module.train(training)
        xi = x.clone().requires_grad_(training)
        with torch.set_grad_enabled(training):
            out = module(xi)
            out = out[0] if isinstance(out, tuple) else out
            grads = grads_of(out, [xi] + params) if training else []
        return out.detach(), grads

    want, want_g = run(block)
    results = []
    for form, choose in FORMS.items():
        monkeypatch.setattr(lowering, "batched_path", choose)
        results.append(run(fast))
    for out, grads in results:
        assert close(out, want)
        for g, r in zip(grads, want_g):
            assert close(g, r, rtol=1e-4)
    (a, ga), *others = results
    for b, gb in others:
        assert close(a, b)
        for g, r in zip(ga, gb):
            assert close(g, r, rtol=1e-4)


def test_batched_path_is_chosen_by_size_threads_and_autograd(lifted, monkeypatch):
    """decode_ffn up to decode_slots slots; stacked_ffn where it pays, only without autograd and on more
    than one thread; the canonical ops otherwise."""
    _, _, spec = lifted
    k = spec.top_k
    decode = torch.zeros(1, k, dtype=torch.long)
    spread = torch.arange(E_ * 2).remainder(E_).view(-1, k)  # every expert twice: pays
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    with torch.no_grad():
        assert lowering.batched_path(spec, decode) == ("decode", None)
        form, counts = lowering.batched_path(spec, spread)
        assert form == "stacked" and counts.tolist() == [2] * E_
        assert lowering.batched_path(spec, torch.zeros(E_, k, dtype=torch.long)) == (None, None)  # one expert
    assert lowering.batched_path(spec, spread) == (None, None)  # autograd on
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    with torch.no_grad():
        assert lowering.batched_path(spec, spread) == (None, None)


def test_stacked_pays_where_most_experts_get_rows_and_padding_is_small():
    assert batched.stacked_pays([2] * 8, 16)                 # all experts, no padding
    assert not batched.stacked_pays([1, 1, 1, 0, 0, 0, 0, 0], 3)   # few experts
    assert batched.stacked_pays([3, 3, 3, 3, 3, 1, 1, 0], 16)      # 7 of 8 experts, padding 1.5x
    assert not batched.stacked_pays([2, 2, 2, 2, 2, 2, 0, 0], 12)  # 6 of 8 experts: reads a third more
    assert not batched.stacked_pays([9, 1, 1, 1, 1, 1, 1, 1], 16)  # padding 4.5x the rows
    # fewer slots than 85% of the experts cannot pay: the counts are not even read then
    assert not batched.stacked_may_pay(6, 8) and batched.stacked_may_pay(7, 8)
    assert not batched.stacked_may_pay(32, 64) and batched.stacked_may_pay(64, 64)


def test_decode_on_threads_doubles_the_one_thread_bound_up_to_a_quarter_of_the_experts():
    assert batched.decode_slots_on_threads(10, 64) == 16   # Qwen3-MoE-like: 10 slots' weights in 4 MB
    assert batched.decode_slots_on_threads(4, 64) == 8
    assert batched.decode_slots_on_threads(0, 8) == 0      # Mixtral-like: no slot's weights in 4 MB


def test_no_batched_forms_for_per_expert_weights_or_reference_kernels(lifted):
    """ModuleList experts (nothing stacked to gather from) and kernels='reference' never take them."""
    from tests.zoo import LoopBank
    torch.manual_seed(0)
    x = torch.randn(1, 4, 32)
    fast = moecompile.optimize(LoopBank(e=16, k=2), example_inputs=(x,))
    spec = moecompile.explain(fast).moe_layers[0].spec
    assert spec.decode_slots == 0 and not spec.stacked_path
    block, _, _ = lifted
    fast = moecompile.optimize(block, example_inputs=(x,), kernels="reference")
    spec = moecompile.explain(fast).moe_layers[0].spec
    assert spec.decode_slots == 0 and not spec.stacked_path


def test_fast_path_for_plain_stacked_native_blocks_only(lifted):
    assert lifted[2].fast_path
    assert "skip the canonical ops' wrappers" in moecompile.explain(lifted[1]).moe_layers[0].details
    from tests.zoo import LoopBank
    torch.manual_seed(0)
    x = torch.randn(1, 4, 32)
    fast = moecompile.optimize(LoopBank(e=16, k=2), example_inputs=(x,))
    assert not moecompile.explain(fast).moe_layers[0].spec.fast_path          # per-expert weights
    fast = moecompile.optimize(lifted[0], example_inputs=(x,), kernels="reference")
    assert not moecompile.explain(fast).moe_layers[0].spec.fast_path


@pytest.mark.parametrize("T", SIZES + [300])
def test_fast_path_equals_the_general_path_and_the_original(lifted, T, monkeypatch):
    """Without autograd, eager: fast_path.fast_call (taken: counted) gives the general path's outputs, every
    one of them, and the original's; at 300 tokens (N·F1 within SMALL_ROWS) on the grouped form."""
    block, fast, spec = lifted
    x = torch.randn(1, T, 32, generator=torch.Generator().manual_seed(T))
    taken = []
    fast_call = fast_path.fast_call
    monkeypatch.setattr(fast_path, "fast_call", lambda *a: taken.append(1) or fast_call(*a))
    fast.eval()
    with torch.no_grad():
        got = fast(x)
        monkeypatch.setattr(spec, "fast_path", False)
        general = fast(x)
        want = block(x)
    assert taken == [1]
    got, general, want = (t if isinstance(t, tuple) else (t,) for t in (got, general, want))
    assert len(got) == len(general)
    for a, b in zip(got, general):
        assert close(a, b)
    assert close(got[0], want[0])
    with torch.enable_grad():
        monkeypatch.setattr(spec, "fast_path", True)
        fast(x)
    assert taken == [1], "with autograd on, the general path"


# The bagged form (kernels/bagged.py): fast-path calls of few slots, over a kept copy of the weights.

def _bag_counted(monkeypatch):
    taken = []
    bag_ffn = bagged.bag_ffn
    monkeypatch.setattr(bagged, "bag_ffn", lambda *a: taken.append(1) or bag_ffn(*a))
    return taken


def _out(t):
    return t[0] if isinstance(t, tuple) else t


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("T", SIZES + [3 * E_ // K_, 3 * E_ // K_ + 1])
def test_bagged_form_equals_the_original_where_it_is_taken(lifted, T, threads, monkeypatch):
    """Calls without autograd of at most spec.bag_slots slots (E slots on one thread) take the bagged form
    and equal the original; with autograd, and above the bound, the other paths run."""
    block, fast, spec = lifted
    assert spec.bag_slots == bagged.SLOTS_PER_EXPERT * E_
    taken = _bag_counted(monkeypatch)
    x = torch.randn(1, T, 32, generator=torch.Generator().manual_seed(T))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            got, want = _out(fast(x)), _out(block(x))
        fast(x)  # autograd on: never the bagged form
    finally:
        torch.set_num_threads(before)
    most = spec.bag_slots if threads > 1 else E_
    assert taken == ([1] if 0 < T * K_ <= most else [])
    assert close(got, want)


@pytest.mark.parametrize("k", [1, K_])
def test_bagged_form_takes_strided_tokens(k, monkeypatch):
    """Hidden states that are a strided view (each sequence's last position, as a caller slicing a prefill's
    output passes them), top-1 (the tokens themselves are the bags' weights) and top-k."""
    block = qwen3_block(k)
    fast = moecompile.optimize(block, example_inputs=(torch.randn(2, 8, 32),))
    taken = _bag_counted(monkeypatch)
    x = torch.randn(3, 5, 32)[:, -1:, :]                                          # [3, 1, 32], not contiguous
    with torch.no_grad():
        assert close(_out(fast(x)), _out(block(x)))
    assert taken == [1]


def test_fast_path_steps_aside_for_a_dispatch_mode(lifted, monkeypatch):
    """Under any dispatch mode (a tracer's, or a user's such as a FLOP counter) the canonical ops run, so the
    mode sees them: the fast path returns before any work, and the result is the same."""
    from torch.utils.flop_counter import FlopCounterMode
    block, fast, _ = lifted
    taken = _bag_counted(monkeypatch)
    x = torch.randn(1, 1, 32)
    with torch.no_grad():
        with FlopCounterMode(display=False):
            got = _out(fast(x))
        assert close(got, _out(block(x)))
        assert taken == []
        fast(x)
    assert taken == [1]


def _change_in_place(block, fast):
    with torch.no_grad():
        block.experts.gate_up_proj.mul_(1.5)


def _change_through_data(block, fast):
    block.experts.down_proj.data.add_(0.25)  # bypasses the version counter: the sample sees it


def _replace_parameter(block, fast):  # the optimized block shares Parameter objects, not attributes: set both
    new = torch.nn.Parameter(block.experts.gate_up_proj.detach() * -1)
    block.experts.gate_up_proj = fast.experts.gate_up_proj = new


def _load_state_dict(block, fast):
    block.load_state_dict({k: v * 0.5 for k, v in block.state_dict().items()})


@pytest.mark.parametrize("change", [_change_in_place, _change_through_data, _replace_parameter, _load_state_dict])
def test_bagged_form_follows_weight_changes(change):
    """After the copy is made, the weights change (in place, through .data, a new Parameter, load_state_dict):
    the next call uses the new weights, as the original does."""
    block = qwen3_block()
    fast = moecompile.optimize(block, example_inputs=(torch.randn(2, 8, 32),))
    x = torch.randn(1, 2, 32)
    with torch.inference_mode():  # the copy made in inference mode serves later no_grad calls too
        fast(x)
    change(block, fast)
    with torch.no_grad():
        assert close(_out(fast(x)), _out(block(x)))


def test_decode_copy_bytes_bounds_the_copies():
    block = qwen3_block()
    x = (torch.randn(2, 8, 32),)
    none = moecompile.optimize(block, example_inputs=x, decode_copy_bytes=0)
    layer = moecompile.explain(none).moe_layers[0]
    assert layer.spec.bag_slots == 0 and any("no decode copy" in n for n in layer.spec.notes)
    e = block.experts
    need = bagged.table_bytes(e.gate_up_proj, e.down_proj)
    fits = moecompile.optimize(block, example_inputs=x, decode_copy_bytes=need)
    assert fits.__class__ is block.__class__
    assert moecompile.explain(fits).moe_layers[0].spec.bag_slots > 0
    with pytest.raises(ValueError, match="decode_copy_bytes"):
        moecompile.optimize(block, decode_copy_bytes=-1)


def test_the_copy_is_neither_saved_nor_copied(tmp_path):
    """torch.save of an optimized block after a bagged call writes no copy of the weights; the loaded and
    a deep-copied block give the same outputs."""
    import copy
    block = qwen3_block()
    x = torch.randn(1, 2, 32)
    torch.save(block, tmp_path / "plain.pt")
    fast = moecompile.optimize(block, example_inputs=(torch.randn(2, 8, 32),))
    with torch.no_grad():
        want = _out(fast(x))
    torch.save(fast, tmp_path / "fast.pt")
    plain, saved = (tmp_path / "plain.pt").stat().st_size, (tmp_path / "fast.pt").stat().st_size
    assert saved < plain + bagged.table_bytes(block.experts.gate_up_proj) // 2
    loaded = torch.load(tmp_path / "fast.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(_out(loaded(x)), want) and torch.equal(_out(copy.deepcopy(fast)(x)), want)


def test_bagged_form_turns_off_where_the_weights_change_every_call():
    """Weights changed in place before every call (as a sharded model gathering them anew would): after
    bagged.RENEWALS stale copies the block stops copying, says so, and stays equal to the original."""
    block = qwen3_block()
    fast = moecompile.optimize(block, example_inputs=(torch.randn(2, 8, 32),))
    spec = moecompile.explain(fast).moe_layers[0].spec
    x = torch.randn(1, 2, 32)
    with torch.no_grad():
        for _ in range(bagged.RENEWALS + 2):
            block.experts.down_proj.mul_(1.01)
            assert close(_out(fast(x)), _out(block(x)))
    assert spec.bag_slots == 0 and any("turned off" in n for n in spec.notes)


@pytest.mark.parametrize("T", SIZES[1:])
@pytest.mark.parametrize("activation,fused", [("swiglu", "halves"), ("swiglu", "interleaved"), ("swiglu", ""),
                                              ("geglu", ""), ("gelu", "")])
@pytest.mark.parametrize("cut", [False, True])
def test_bag_ffn_equals_the_reference(T, activation, fused, cut, monkeypatch):
    """bagged.bag_ffn over tables of stacked weights (fused halves or interleaved, a separate up projection,
    none): the reference's dispatch → expert_ffn → combine; `cut`: every bag cut in parts over 4 threads."""
    gen = torch.Generator().manual_seed(T + 200)
    D, F = 8, 6
    w = {r: None if t is None else t.detach() for r, t in expert_weights(E_, D, F, fused, False, gen).items()}
    if activation == "gelu":
        w["w3"] = None
    indices = torch.rand(T, E_, generator=gen).topk(K_, -1).indices
    weights = torch.rand(T, K_, generator=gen)
    x = torch.randn(T, D, generator=gen)
    want = reference_moe(x, weights, indices, w, E_, activation, fused)
    kept = bagged.renewed(torch.nn.Module(), w["w1"], w["w2"], w["w3"])
    before = torch.get_num_threads()
    if cut:
        monkeypatch.setattr(bagged, "PART_BYTES", 0)
        torch.set_num_threads(4)
    try:
        got = bagged.bag_ffn(x, weights, indices, kept, activation, fused, 1.702, 7.0)
    finally:
        torch.set_num_threads(before)
    assert close(got, want)


def test_bag_ffn_reads_the_tables_last_rows():
    """Every token routed to the last expert, whose rows end both tables: none of them is skipped (aten's
    embedding_bag takes a padding_idx, and -1 there means the table's last row, not none)."""
    gen = torch.Generator().manual_seed(5)
    D, F = 8, 6
    w = {r: None if t is None else t.detach() for r, t in expert_weights(E_, D, F, "halves", False, gen).items()}
    indices = torch.full((3, 1), E_ - 1)
    weights, x = torch.rand(3, 1, generator=gen), torch.randn(3, D, generator=gen)
    kept = bagged.renewed(torch.nn.Module(), w["w1"], w["w2"], w["w3"])
    got = bagged.bag_ffn(x, weights, indices, kept, "swiglu", "halves", 1.702, 7.0)
    assert close(got, reference_moe(x, weights, indices, w, E_, "swiglu", "halves"))


@pytest.mark.parametrize("on_onednn", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("activation,fused", [("swiglu", "halves"), ("swiglu", ""), ("gelu", "")])
def test_padded_expert_gemms_equal_the_reference(threads, activation, fused, on_onednn, monkeypatch):
    """The expert FFN with autograd (native forward with save, and backward) on many experts of a few rows
    each runs its GEMMs as bmm over rows padded per expert (padded.Padded, on two or more threads), except
    where oneDNN takes the experts' weights (forced here for every size): there its grouped GEMMs run. Either
    way outputs, the input's and every weight's gradient equal the reference's, experts without rows getting
    zero."""
    if on_onednn and not onednn.available():
        pytest.skip("this torch build has no oneDNN")
    linear_calls, linear = [], onednn._LINEAR
    monkeypatch.setattr(onednn, "ENABLED", on_onednn)
    monkeypatch.setattr(onednn, "MIN_WEIGHT", 0)
    monkeypatch.setattr(onednn, "_LINEAR", lambda *a: linear_calls.append(1) or linear(*a))
    gen = torch.Generator().manual_seed(threads)
    E, D, F = 16, 8, 6
    w = {r: None if t is None else t.detach() for r, t in expert_weights(E, D, F, fused, False, gen).items()}
    if activation == "gelu":
        w["w3"] = None
    counts = torch.randint(3, 6, (E,), generator=gen)  # padding within what Padded.pays takes
    counts[3] = 0
    x = torch.randn(int(counts.sum()), D, generator=gen)
    grad_y = torch.randn(x.shape, generator=gen)
    lists = [None if w[r] is None else [w[r]] for r in ROLES]
    made, init = [], padded.Padded.__init__
    monkeypatch.setattr(padded.Padded, "__init__", lambda self, *a: made.append(1) or init(self, *a))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, *saved = native.expert_ffn_forward(x, counts, *lists, activation, fused, 1.702, 7.0)
        grad_x, grads = native.expert_ffn_backward(grad_y, x, counts, saved, *lists, activation, fused, 1.702, 7.0)
    finally:
        torch.set_num_threads(before)
    assert len(made) == (2 if threads > 1 and not on_onednn else 0)  # forward and backward, on two threads only
    assert bool(linear_calls) == on_onednn
    want_y = ref.expert_ffn(x, counts, *lists, activation, fused, 1.702, 7.0)
    want_x, want = ref.expert_ffn_backward(grad_y, x, counts, saved, *lists, activation, fused, 1.702, 7.0)
    assert close(y, want_y) and close(grad_x, want_x)
    assert all(close(grads[r], want[r]) for r in ("w1", "w2", "w3"))
    assert not grads["w1"][3].any()


@pytest.mark.parametrize("sizes,pays", [
    ([2] * 40 + [6] + [0] * 23, False),     # rows for 41 of 64 experts: the grouped GEMMs skip 23
    ([2] * 56 + [6] * 8, True),             # 2.4x padding, but a few rows per expert: E·m ≤ 1.5·N + 4·E
    ([8] * 60 + [17] * 4, False),           # 2.0x at 8 rows: 17·64 > 1.5·548 + 256
    ([16] * 63 + [28], True),               # 1.73x at 16 rows per expert: 28·64 ≤ 1.5·1036 + 256
    ([32] * 63 + [56], False),              # 1.73x at 32: 56·64 > 1.5·2072 + 256
    ([40] * 64, False),                     # more than 32 rows per expert on average
])
def test_padded_gemms_pay_by_rows_and_padding(sizes, pays, monkeypatch):
    """Padded.pays: the padded rows E·m against 1.5·N + 4·E, rows for at least 3/4 of the experts."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    counts = torch.tensor(sizes)
    assert padded.Padded.pays(native.row_blocks(counts), counts, torch.empty(int(counts.sum()), 4)) is pays


def test_explain_names_the_padded_gemms(lifted):
    """explain() says which calls with autograd may take the padded GEMMs: blocks of 16 or more experts on the
    native kernels; with the reference kernels, none."""
    block, fast, _ = lifted
    assert "bmm over rows padded per expert" in moecompile.explain(fast).moe_layers[0].details
    x = torch.randn(1, 4, 32)
    plain = moecompile.optimize(block, example_inputs=(x,), kernels="reference")
    assert "padded per expert" not in moecompile.explain(plain).moe_layers[0].details
