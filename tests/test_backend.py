"""torch.compile(model, backend="moecompile"): MoE blocks lifted inside Dynamo's graphs, then AOTAutograd (and
Inductor once): outputs and every gradient equal eager, one compilation for repeated steps, graph breaks and
bad options reported. Most tests use options={"compiler": "eager"} (no code generation: Inductor's C++ build
takes tens of seconds on this machine); one test runs Inductor.
"""
import functools
import subprocess
import sys

import pytest
import torch

import moecompile
from moecompile import backend
from moecompile.kernels import why_no_triton
from moecompile.models import gpt_moe
from moecompile.passes import inductor_kernels
from moecompile.passes.inductor_kernels import InductorKernels, op_name
from moecompile.validation import max_relative_error
from tests import hf_zoo
from moecompile.runtime.spawn import run_ranks
from tests.helpers import assert_same_training_step, loss_of, run_jobs
from tests.zoo import BiasedBank, EinsumBank, LoopBank, Net

EAGER = {"compiler": "eager"}
# every family of the core issue that Dynamo captures whole (Switch Transformers raises inside Dynamo with
# fullgraph=True and is tested below with graph breaks)
FULLGRAPH = ["mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3", "gpt_oss", "ernie4_5_moe", "cohere2_moe"]
HAND_WRITTEN = {"loop": LoopBank, "einsum": EinsumBank, "biased": BiasedBank}


def _gpt():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 16))
    return gpt_moe(n_layer=4, d_model=32, d_ff=64, n_head=2, max_seq=16, num_experts=4), (x, x), {}


def _two_moe_blocks():
    """_gpt()'s model without its two dense blocks: the same two MoE blocks in one graph, for the tests that
    generate code (Inductor: the dense blocks' code costs ~15 s per process here and is not what they test)."""
    torch.manual_seed(0)
    return gpt_moe(n_layer=2, moe_every=1, d_model=32, d_ff=64, n_head=2, max_seq=16, num_experts=4)


def _compiled(model, fullgraph=True, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="moecompile", options={**EAGER, **options}, fullgraph=fullgraph)


def _assert_all_lifted(compiled, n):
    report = moecompile.explain(compiled)
    assert [m.rewritten for m in report.moe_layers] == [True] * n, str(report)
    notes = " ".join(report.notes)
    for op in ("route", "dispatch", "expert_ffn", "combine"):  # in the forward and the backward graph
        assert f"{op} ×" in notes and f"{op}_backward ×" in notes, notes
    return report


@pytest.mark.parametrize("family", FULLGRAPH)
def test_hf_families_equal_eager(family):
    torch.manual_seed(0)
    model = hf_zoo.FAMILIES[family]()
    args, kwargs = hf_zoo.inputs(family)
    compiled = _compiled(model)
    assert_same_training_step(model, compiled, args, kwargs)
    args, kwargs = hf_zoo.inputs(family, seed=1)  # new data, same graph
    assert_same_training_step(model, compiled, args, kwargs)
    moe_layers = sum(1 for _, m in model.named_modules() if hasattr(m, "experts"))
    _assert_all_lifted(compiled, moe_layers)


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_hand_written_blocks_equal_eager(name):
    torch.manual_seed(0)
    model = Net(HAND_WRITTEN[name]())
    compiled = _compiled(model)
    assert_same_training_step(model, compiled, (torch.randn(2, 5, 32),), {})
    report = _assert_all_lifted(compiled, 1)
    assert report.moe_layers[0].name == "block"


def test_a_compiled_moe_block_itself_is_lifted():
    """torch.compile on the MoE block alone (benchmarks/moe_layer.py does): the graph is all block."""
    torch.manual_seed(0)
    block = hf_zoo.mixtral().model.layers[0].mlp
    compiled = _compiled(block)
    x = torch.randn(2, 12, 32, requires_grad=True)  # a graph input: dispatch_backward only if it needs a grad
    assert_same_training_step(block, compiled, (x,), {})
    report = _assert_all_lifted(compiled, 1)
    assert report.moe_layers[0].name == backend.ROOT


def test_gpt_moe_compiles_once_for_repeated_steps():
    """The reference GPT-MoE's expert loop (`nonzero`, data-dependent row counts) stays in one graph, and
    training steps on new data of the same shape reuse it."""
    model, args, kwargs = _gpt()
    calls = []
    original = backend.lift_blocks

    def counted(*a, **kw):
        calls.append(1)
        return original(*a, **kw)
    backend.lift_blocks = counted
    try:
        compiled = _compiled(model)
        for seed in range(3):
            x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))
            assert_same_training_step(model, compiled, (x, x), {})
    finally:
        backend.lift_blocks = original
    assert len(calls) == 1, f"compiled {len(calls)} times for 3 steps of the same shape"
    assert torch._dynamo.explain(model)(*args).graph_break_count == 0
    _assert_all_lifted(compiled, 2)


def test_a_graph_break_inside_a_block_is_reported():
    """A block split over two graphs cannot be lifted from either: explain() says so, results stay eager's."""
    class Broken(LoopBank):
        def forward(self, x):
            torch._dynamo.graph_break()
            return super().forward(x)
    torch.manual_seed(0)
    model = Net(Broken())
    compiled = _compiled(model, fullgraph=False)
    assert_same_training_step(model, compiled, (torch.randn(2, 5, 32),), {})
    report = moecompile.explain(compiled)
    assert not any(m.rewritten for m in report.moe_layers)


def test_switch_with_graph_breaks_equals_eager():
    torch.manual_seed(0)
    model = hf_zoo.switch()
    args, kwargs = hf_zoo.inputs("switch")
    compiled = _compiled(model, fullgraph=False)
    assert_same_training_step(model, compiled, args, kwargs)
    report = moecompile.explain(compiled)
    assert report.moe_layers or report.notes, "the backend must say what it did with Switch's routers"


def test_an_optimized_model_compiles():
    """Options that create parameters go through optimize() first; its result compiles with the backend (no
    selection left to lift: the rest goes through AOTAutograd), equal to it, and explain() shows both."""
    model, args, kwargs = _gpt()
    scmoe = moecompile.optimize(model, args, shortcut="scmoe")
    compiled = _compiled(scmoe)
    assert_same_training_step(scmoe, compiled, args, kwargs)
    report = _assert_all_lifted(compiled, 2)
    assert any("architecture changed" in n for n in report.notes)


def _expert_parallel_compiled(rank, ws, options, compiler="eager"):
    """Max relative error of 3 compiled training steps (new tokens each) against the uncompiled model, and how
    many times Dynamo called the backend (two MoE blocks: two blocks' exchanges in one graph)."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("ep",))
    model = _two_moe_blocks()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(rank))
    fast = moecompile.optimize(model, (x, x), mesh=mesh, **options)
    params = dict(fast.named_parameters())
    calls, original = [], backend.lift_blocks
    backend.lift_blocks = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    # fullgraph: the exchanges' data-dependent splits stay in the graph; adaptive's table measures per call
    compiled = _compiled(fast, fullgraph=options.get("parallelism") != "adaptive", compiler=compiler)
    errors = []
    for step in range(3):
        x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(10 * step + rank))
        results = []
        for m in (fast, compiled):
            for p in params.values():
                p.grad = None
            loss = m(x, x)[1]
            loss.backward()
            results.append([loss.detach()] + [p.grad.clone() for p in params.values()])
        errors.append(max(max_relative_error(a, b, b) for a, b in zip(*results)))
    backend.lift_blocks = original
    return max(errors), len(calls)


EXPERT_PARALLEL = {"degree1": ({}, "eager"), "degree2-capacity": ({"overlap": 2, "capacity_factor": 1.0}, "eager"),
                   "degree2-scmoe": ({"overlap": 2, "shortcut": "scmoe"}, "eager"),
                   "degree2-inductor": ({"overlap": 2}, "inductor"), "adaptive": ({"parallelism": "adaptive"}, "eager")}


@pytest.fixture(scope="module")
def expert_parallel_runs():
    """Every case of EXPERT_PARALLEL on the same 2 gloo ranks, one after the other (each resets Dynamo): one
    spawn for all instead of one per test → {case: [each rank's (error, compilations)]}."""
    jobs = {case: (_expert_parallel_compiled, *args) for case, args in EXPERT_PARALLEL.items()}
    results = run_ranks(run_jobs, 2, jobs)
    return {case: [r[case] for r in results] for case in jobs}


@pytest.mark.parametrize("case", [c for c in EXPERT_PARALLEL if c != "adaptive"])
def test_an_expert_parallel_model_compiles_into_one_graph(case, expert_parallel_runs):
    """An expert-parallel model (2 gloo ranks) compiles with fullgraph=True: the all-to-alls are functional
    collectives on unbacked split sizes, so new routing does not recompile; every step equals the uncompiled
    model (outputs and gradients), under the eager compiler and Inductor."""
    for error, compilations in expert_parallel_runs[case]:
        assert error < 1e-5, f"{case}: relative error {error:.2e}"
        assert compilations == 1, f"{case}: compiled {compilations} times for 3 steps with new routing"


def test_adaptive_parallelism_compiles_with_graph_breaks(expert_parallel_runs):
    """Adaptive parallelism's table measures and switches r per call, which Dynamo cannot trace: it compiles
    with graph breaks and still equals the uncompiled model at every step (its trials included)."""
    for error, _ in expert_parallel_runs["adaptive"]:
        assert error < 1e-5, f"relative error {error:.2e}"


def test_options_are_checked():
    model, args, _ = _gpt()
    with pytest.raises(Exception, match="mesh change the model's parameters"):
        _compiled(model, mesh=object())(*args)
    with pytest.raises(Exception, match="unknown option"):
        _compiled(model, fusion=True)(*args)
    with pytest.raises(Exception, match="unknown option"):
        _compiled(model, compiler="tvm")(*args)
    with pytest.raises(Exception, match="kernels='cutlass'; expected"):
        _compiled(model, kernels="cutlass")(*args)


def test_kernels_option_reaches_the_lifted_blocks():
    model, args, kwargs = _gpt()
    compiled = _compiled(model, kernels="reference")
    assert_same_training_step(model, compiled, args, kwargs)
    assert all(set(m.spec.kernels.values()) == {"reference"} for m in moecompile.explain(compiled).moe_layers)


def test_registered_without_import():
    code = ("import torch, torch._dynamo; import sys; assert 'moecompile' not in sys.modules; "
            "assert 'moecompile' in torch._dynamo.list_backends(exclude_tags=())")
    subprocess.run([sys.executable, "-c", code], check=True)


_RANKED = {"reference": 1.0, "triton": 2.0, "native": 3.0}  # ms: made-up timings that force every switch


@pytest.mark.slow
def test_inductor_trains_equal_to_eager(monkeypatch):
    """Inductor generates the code around the canonical ops (C++ here): outputs and gradients equal eager. The
    kernel-selection pass runs inside it on both graphs: with autotune timings under which reference is the
    fastest and triton (Triton's interpreter here) the next, the forward graph's expert_ffn and the backward
    graph's expert_ffn_backward move to triton together, route, dispatch and combine to reference, and
    training still equals eager."""
    monkeypatch.setattr(inductor_kernels, "_timed", lambda family, device, signature, b: _RANKED[b])
    model, (args, kwargs) = _two_moe_blocks(), _gpt()[1:]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moecompile", options={"autotune": True}, fullgraph=True)
    assert_same_training_step(model, compiled, args, kwargs)
    notes = " ".join(_assert_all_lifted(compiled, 2).notes)
    triton = why_no_triton("cpu") is None
    # autotune: no cache serves the graphs (uuid() is None), so the pass ran on both
    assert f"forward graph: kernel selection: {6 + 2 * triton} of 8" in notes, notes
    assert "route native→reference ×2" in notes and "combine native→reference ×2" in notes, notes
    assert ("expert_ffn native→triton ×2" in notes) == triton, notes
    assert ("expert_ffn_backward native→triton ×2" in notes) == triton, notes


def _lifted_net():
    """A hand-written block in a small net, and its optimize() result (native kernels here)."""
    torch.manual_seed(0)
    model, x = Net(LoopBank()), torch.randn(2, 5, 32)
    return model, moecompile.optimize(model, (x,)), x


def _aot_graphs(model, args) -> list:
    """(graph, real inputs) of the forward and the backward graph AOTAutograd makes of `model` in one
    training step, without the moecompile backend (so without the pass)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    calls = []

    def capture(graph, _):
        def run(*inputs):
            calls.append((graph, inputs))
            return graph(*inputs)
        return make_boxed_func(run)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=capture, bw_compiler=capture), fullgraph=True)
    loss_of(compiled(*args)).backward()
    return calls


def _backends(graph: torch.fx.GraphModule) -> dict[str, str]:
    return {name: n.args[-1] for n in graph.graph.nodes if (name := op_name(n))}


def test_kernel_selection_pass_rewrites_what_both_graphs_allow():
    """The pass alone on AOTAutograd's graphs: kernels="reference" moves the forward's route, dispatch and
    combine to reference (their saved tensors are their inputs and outputs, the same under any backend) and
    keeps expert_ffn (reference saves none of its activations) and every backward op (reference's backward
    is plain torch, no such op); the forward graph computes the same values as before."""
    _, fast, x = _lifted_net()
    (forward, inputs), (backward, _) = _aot_graphs(fast, (x,))
    assert set(_backends(forward).values()) == set(_backends(backward).values()) == {"native"}
    before = forward(*inputs)
    selection = InductorKernels("reference")
    selection(forward.graph)
    forward.recompile()
    assert _backends(forward) == {"route": "reference", "dispatch": "reference", "expert_ffn": "native",
                                  "combine": "reference"}
    outcome = selection.outcomes[-1]
    assert sum(outcome.changed.values()) == 3 and list(outcome.kept) == ["expert_ffn"]
    for a, b in zip(before, forward(*inputs)):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    selection(backward.graph)
    outcome = selection.outcomes[-1]
    assert set(_backends(backward).values()) == {"native"} and not outcome.changed and len(outcome.kept) == 4


def test_kernel_selection_uuid_is_stable_and_follows_the_options():
    """Inductor's cache key holds uuid(): the same in another process, different for other options, and None
    (no caching) with autotune, whose choice rests on measured times."""
    uuid = InductorKernels("auto").uuid()
    assert isinstance(uuid, str) and uuid == InductorKernels("auto").uuid()
    assert uuid != InductorKernels("native").uuid() != InductorKernels("reference").uuid()
    assert InductorKernels("auto", autotune=True).uuid() is None
    code = "from moecompile.passes.inductor_kernels import InductorKernels; print(InductorKernels('auto').uuid())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == uuid


def test_autotune_keeps_the_fastest_and_both_graphs_agree(monkeypatch):
    """Real timings (Triton's interpreter counts as runnable here, conftest sets TRITON_INTERPRET=1): every
    forward op takes its family's fastest backend, and the backward graph, passed separately, reads the
    same timings: expert_ffn_backward takes expert_ffn's backend, whose saved tensors it reads."""
    monkeypatch.setattr(inductor_kernels, "_TIMES", {})
    _, fast, x = _lifted_net()
    (forward, _), (backward, _) = _aot_graphs(fast, (x,))
    selection = InductorKernels("auto", autotune=True)
    selection(forward.graph)
    timed = selection.outcomes[-1].timed
    triton = why_no_triton("cpu") is None  # expert_ffn: native or triton, so timed only when triton can run
    assert {f: len(t) for f, t in timed.items()} == {"route": 2 + triton, "dispatch": 2 + triton,
                                                     "combine": 2 + triton, **({"expert_ffn": 2} if triton else {})}
    assert all(_backends(forward)[f] == min(t, key=t.get) for f, t in timed.items())
    selection(backward.graph)
    chosen = _backends(backward)
    assert chosen["expert_ffn_backward"] == _backends(forward)["expert_ffn"]
    assert selection.outcomes[-1].timed.get("expert_ffn") == timed.get("expert_ffn")  # timed once, for the forward
    combine = {b: ms for b, ms in timed["combine"].items() if b != "reference"}
    assert chosen["combine_backward"] == min(combine, key=combine.get)
    assert chosen["route_backward"] == chosen["dispatch_backward"] == "native"  # no forward arguments: device's


def test_max_autotune_mode_selects_in_both_graphs(monkeypatch):
    """mode="max-autotune" turns autotune on; with the eager compiler the pass runs on AOTAutograd's graphs
    as Inductor would, and training with the switched backends equals eager."""
    monkeypatch.setattr(inductor_kernels, "_timed", lambda family, device, signature, b: _RANKED[b])
    model, fast, x = _lifted_net()
    torch._dynamo.reset()
    compiled = torch.compile(fast, backend=functools.partial(backend.moecompile_backend, options=EAGER,
                                                             mode="max-autotune"), fullgraph=True)
    assert_same_training_step(model, compiled, (x,), {})
    notes = " ".join(moecompile.explain(compiled).notes)
    if why_no_triton("cpu") is None:  # expert_ffn and its backward to triton, combine_backward too
        assert "forward graph: kernel selection: 4 of 4" in notes and "backward graph: kernel selection: 2 of 4" \
            in notes and "expert_ffn_backward native→triton ×1" in notes, notes
    else:  # reference for route, dispatch and combine; expert_ffn and the backward ops have no other choice
        assert "forward graph: kernel selection: 3 of 4" in notes and "backward graph: kernel selection: 0 of 4" \
            in notes, notes


def test_capacity_options_reach_the_lifted_blocks():
    """capacity_factor and batch_prioritized, like optimize()'s: the compiled model trains like the optimize()
    result with the same options (a different function from the eager model's: tokens are dropped)."""
    model, args, kwargs = _gpt()
    want = moecompile.optimize(model, args, kwargs, capacity_factor=0.5, batch_prioritized=True)
    compiled = _compiled(model, capacity_factor=0.5, batch_prioritized=True)
    assert_same_training_step(want, compiled, args, kwargs)
    layers = moecompile.explain(compiled).moe_layers
    assert all(m.spec.routing.capacity_factor == 0.5 and m.spec.routing.batch_prioritized for m in layers)
    # C = ⌈2·0.5·32/4⌉ = 8 slots per expert of 64 token-slots: at least half dropped in each block
    assert all(m.spec.drops.dropped >= 32 for m in moecompile.explain(want).moe_layers)
