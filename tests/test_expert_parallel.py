"""Expert parallelism on 2 and 4 gloo processes equals one process: outputs and every gradient.

The tests of one world size share one spawn of their ranks (moecompile/runtime/spawn.py; a module fixture per
world size runs every test's list of cases there, one test after the other: a spawn and its imports cost ~5 s
for 2 ranks, ~9 s for 4); every rank returns the worst relative error per case and each test asserts on its
own. Rank r trains on slice r of a global batch that every rank can rebuild from a seed; the single-process
reference runs the whole global batch.
"""
import dataclasses
import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import moecompile
from moecompile.models import gpt_dense, gpt_moe
from moecompile.runtime.expert_parallel import ExpertParallel, Placement, reduce_gradients
from moecompile.validation import max_relative_error
from tests import hf_families, hf_zoo
from moecompile.runtime.spawn import run_ranks
from tests.helpers import run_jobs
from tests.zoo import BiasedBank, EinsumBank, LoopBank, Net

TOL = 1e-5
# a gradient's error is relative to at least this fraction of the model's largest gradient: one that nearly
# cancels measures summation order, not the rewrite (Qwen3.5-MoE's linear-attention dt_bias: |g| ~1e-6
# against ~0.01 elsewhere, its relative error 3e-5 when the batch is split over ranks)
GRAD_FLOOR = 1e-3
HAND_WRITTEN = {"loop": LoopBank, "einsum": EinsumBank, "biased": BiasedBank}  # tests/zoo.py blocks in a Net
TUNING_CALLS = 14  # enough training calls for overlap="auto" to try its degrees (at most 4 x 3) and settle


# ---- the runtime alone: hand-made rows and counts, a nonlinear expert per e --------------------------------
def _experts(W):
    """ffn(rows, counts): expert e maps its block of rows to tanh(rows @ W[e] + 0.5) (padding rows of zeros
    give nonzero outputs, so a padding row that leaked into a result would show)."""
    def ffn(rows, counts):
        blocks = rows.split(counts.tolist())
        return torch.cat([torch.tanh(b @ W[e] + 0.5) for e, b in enumerate(blocks)])
    return ffn


def _runtime_cases(rank, ws, cases):
    errors = {}
    for name, (sizes, counts_by_rank, chunks, *capacity) in cases.items():
        E, D = len(counts_by_rank[0]), 8
        g = torch.Generator().manual_seed(0)
        W = torch.randn(E, D, D, generator=g) / D ** 0.5
        xs = [torch.randn(sum(c), D, generator=g) for c in counts_by_rank]
        cot = [torch.randn(sum(c), D, generator=g) for c in counts_by_rank]
        # one process: every rank's rows through all experts; the expert gradient sums every rank's part
        W_ref = W.clone().requires_grad_()
        x_ref = [x.clone().requires_grad_() for x in xs]
        y_ref = [_experts(W_ref)(x, torch.tensor(c)) for x, c in zip(x_ref, counts_by_rank)]
        sum((y * c).sum() for y, c in zip(y_ref, cot)).backward()
        # expert parallel
        placement = Placement.explicit(sizes, E, ws)
        local = placement.local(rank)
        ep = ExpertParallel(dist.group.WORLD, rank, ws, placement, chunks=chunks)
        W_local = W[local.start:local.stop].clone().requires_grad_()
        x = xs[rank].clone().requires_grad_()
        y, _ = ep.run(x, torch.tensor(counts_by_rank[rank]), _experts(W_local), *capacity)
        (y * cot[rank]).sum().backward()
        errors[name] = max(max_relative_error(y, y_ref[rank].detach(), y),
                           max_relative_error(x.grad, x_ref[rank].grad, x),
                           max_relative_error(W_local.grad, W_ref.grad[local.start:local.stop], W_local))
    return errors


RUNTIME_CASES = {
    2: {
        "even": ((2, 2), [[3, 1, 4, 2], [0, 5, 2, 1]], 1),
        "chunks 2": ((2, 2), [[3, 1, 4, 2], [0, 5, 2, 1]], 2),
        "chunks 3 (fewer rows than chunks)": ((2, 2), [[3, 1, 4, 2], [0, 5, 2, 1]], 3),
        "an expert receives no rows": ((2, 2), [[3, 0, 4, 2], [1, 0, 2, 1]], 2),
        "a rank sends no rows": ((2, 2), [[3, 1, 4, 2], [0, 0, 0, 0]], 2),
        "no rows anywhere": ((2, 2), [[0, 0, 0, 0], [0, 0, 0, 0]], 1),
        "uneven placement": ((1, 4), [[2, 3, 0, 1, 4], [1, 1, 2, 0, 3]], 2),
        "fixed capacity buffers": ((2, 2), [[3, 1, 4, 2], [0, 4, 2, 1]], 1, 4),
        "fixed capacity buffers, chunks 3": ((2, 2), [[3, 1, 4, 2], [0, 4, 2, 1]], 3, 5),
    },
    4: {
        "even": ((2, 2, 2, 2), [[1, 2, 0, 3, 1, 1, 2, 0], [2, 0, 1, 1, 0, 3, 1, 2],
                                [0, 0, 0, 0, 0, 0, 0, 0], [3, 1, 2, 0, 1, 0, 0, 5]], 1),
        "chunks 2": ((2, 2, 2, 2), [[1, 2, 0, 3, 1, 1, 2, 0], [2, 0, 1, 1, 0, 3, 1, 2],
                                    [0, 0, 0, 0, 0, 0, 0, 0], [3, 1, 2, 0, 1, 0, 0, 5]], 2),
        "one expert each, uneven": ((1, 1, 1, 1), [[4, 0, 1, 2], [0, 0, 3, 1], [2, 2, 2, 2], [1, 0, 0, 6]], 3),
        "fixed capacity buffers": ((1, 1, 1, 1), [[4, 0, 1, 2], [0, 0, 3, 1], [2, 2, 2, 2], [1, 0, 0, 4]], 2, 4),
    },
}


def test_placement_errors_say_what_fits():
    with pytest.raises(ValueError, match=r"8 experts cannot be split evenly .* placement=\[3, 3, 2\]"):
        Placement.even(8, 3)
    with pytest.raises(ValueError, match="at least one expert and 8 in all"):
        Placement.explicit([4, 4, 0], 8, 3)
    assert Placement.explicit([3, 3, 2], 8, 3).local(2) == range(6, 8)


def test_mesh_needs_example_inputs():
    with pytest.raises(ValueError, match="needs example_inputs"):
        moecompile.optimize(gpt_moe(n_layer=2, d_model=32, d_ff=64), mesh=object())


@pytest.mark.parametrize("ws", [2, 4])
def test_runtime_matches_one_process(ws, ranks):
    cases = RUNTIME_CASES[ws]
    results = ranks(ws, "runtime")
    for name in cases:
        worst = max(r[name] for r in results)
        assert worst < TOL, f"{ws} ranks, {name}: relative error {worst:.2e}"


# ---- whole models through optimize(mesh=...) ----------------------------------------------------------------
def _build(family):
    torch.manual_seed(0)
    if family == "gpt_moe":
        return gpt_moe(n_layer=2, d_model=32, d_ff=64, n_head=4, num_experts=8, max_seq=16)
    if family == "gpt_dense":
        return gpt_dense(n_layer=2, d_model=32, d_ff=64, n_head=4, max_seq=16)
    if family in HAND_WRITTEN:
        return Net(HAND_WRITTEN[family]())
    if family in hf_families.FAMILIES:
        import transformers
        model_cls, config_cls, kwargs = hf_families.FAMILIES[family]
        return hf_zoo.nonzero_biases(getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)))
    return hf_zoo.FAMILIES[family]()


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits if hasattr(out, "logits") else out[0]


def _global_batch(family, batch):
    """(args, kwargs) of the global batch; tokens' batch dim first, so rank r takes rows r·b..(r+1)·b."""
    g = torch.Generator().manual_seed(7)
    if family in HAND_WRITTEN:
        return (torch.randn(batch, 12, 32, generator=g),), {}
    ids = torch.randint(1, hf_zoo.V, (batch, 12), generator=g)
    if family == "switch":
        return (), {"input_ids": ids, "decoder_input_ids": torch.randint(1, hf_zoo.V, (batch, 7), generator=g)}
    return (ids,), {}


def _slice(tree, r, parts):
    return tuple(t.chunk(parts)[r] for t in tree[0]), {k: v.chunk(parts)[r] for k, v in tree[1].items()}


def _loss(out):
    """Mean over tokens of a fixed projection of the logits: a mean of equal per-rank means."""
    logits = _logits(out)
    g = torch.Generator().manual_seed(3)
    return (logits * torch.randn(logits.shape[-1], generator=g)).mean()


def _model_cases(rank, ws, mesh_shape, cases):
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("dp", "ep") if len(mesh_shape) == 2 else ("ep",))
    errors = {}
    for name, (family, overlap, *options) in cases.items():
        options = dict(options[0]) if options else {}
        slot = options.pop("slot", None)  # force a shortcut block's expert slot
        b = 2
        args, kwargs = _global_batch(family, b * ws)
        local_args, local_kwargs = _slice((args, kwargs), rank, ws)
        ref = moecompile.optimize(_build(family), args, kwargs, **options)
        whole_batch = name.endswith("over all tokens")
        if whole_batch:  # a capacity over all of a rank's tokens: one group per rank in the reference
            _set_capacity_groups(ref, lambda layer: b * (12 if "encoder" in layer.name else 7))
        _loss(ref(*args, **kwargs)).backward()
        want = dict(ref.named_parameters())
        fast = moecompile.optimize(_build(family), local_args, local_kwargs, mesh=mesh, overlap=overlap, **options)
        if whole_batch:
            _set_capacity_groups(fast, lambda layer: 0)
        for layer in moecompile.explain(fast).moe_layers if slot else ():
            layer.spec.shortcut.slot = slot
        for _ in range(TUNING_CALLS if overlap == "auto" else 1):  # "auto" changes degree as it re-tunes
            for p in fast.parameters():
                p.grad = None
            out = fast(*local_args, **local_kwargs)
            _loss(out).backward()
        reduce_gradients(fast, mesh)
        logits = _logits(out)
        want_logits = _logits(ref(*args, **kwargs)).chunk(ws)[rank]
        worst = max_relative_error(logits, want_logits.detach(), logits)
        sharded = {n for layer in moecompile.explain(fast).moe_layers for n in layer.spec.parallel.expert_params}
        floor = GRAD_FLOOR * max(p.grad.abs().max().item() for p in want.values() if p.grad is not None)
        for n, p in fast.named_parameters():
            g_want = want[n].grad
            if n in sharded:  # this rank's experts: the matching part of the full gradient
                g_want = _local_grad(g_want, p, _layer_of(fast, n).parallel.local_experts)
            worst = max(worst, max_relative_error(p.grad, g_want, p, floor))
        if overlap == "auto":  # the re-tuning must have finished, on the same degree everywhere
            tuners = [layer.spec.parallel.tuner for layer in moecompile.explain(fast).moe_layers]
            assert all(t is not None and t.chosen is not None for t in tuners), [t.summary() for t in tuners]
        errors[name] = worst
    errors["experts that do not divide"] = _uneven_experts_error(mesh, rank, ws)
    return errors


def _uneven_experts_error(mesh, rank, ws) -> float:
    """0 if optimize() refuses E = ep + 1 experts over ep ranks with the expected message, else 1."""
    ep = mesh["ep"].size() if "ep" in (mesh.mesh_dim_names or ()) else mesh.size()
    args, kwargs = _slice(_global_batch("gpt_moe", 2 * ws), rank, ws)
    torch.manual_seed(0)
    model = gpt_moe(n_layer=2, d_model=32, d_ff=64, n_head=4, num_experts=ep + 1, max_seq=16)
    try:
        moecompile.optimize(model, args, kwargs, mesh=mesh)
    except ValueError as e:
        return 0.0 if f"{ep + 1} experts cannot be split evenly" in str(e) else 1.0
    return 1.0


def _set_capacity_groups(model, group_size_of):
    for layer in moecompile.explain(model).moe_layers:
        # group="": fixed groups of that size, or (0) all of a call's tokens, whatever the block's own groups
        layer.spec.capacity = dataclasses.replace(layer.spec.capacity, group_size=group_size_of(layer), group="")


def _layer_of(model, param_name):
    return next(layer.spec for layer in moecompile.explain(model).moe_layers
                if param_name in layer.spec.parallel.expert_params)


def _local_grad(full_grad, local_param, local):
    """The slice of a single-process expert gradient that a sharded parameter holds: a stacked [E, ...]
    parameter keeps rows local.start..; a per-expert parameter is whole (same name, same shape)."""
    if full_grad.shape == local_param.shape:
        return full_grad
    return full_grad[local.start:local.stop]


MODEL_CASES = {
    "gpt_moe": ("gpt_moe", "off"),
    "gpt_moe auto (re-tuned while training)": ("gpt_moe", "auto"),
    "gpt_moe chunks 2": ("gpt_moe", 2),
    "gpt_moe chunks 3": ("gpt_moe", 3),
    "mixtral (stacked experts)": ("mixtral", 2),
    "qwen2_moe (shared expert)": ("qwen2_moe", 1),
    "switch (capacity per sequence, drops)": ("switch", 2),
    "switch (capacity, drops) over all tokens": ("switch", 1),
    "gpt_moe converted to ScMoE": ("gpt_moe", 2, {"shortcut": "scmoe"}),
    "ScMoE, experts at the early slot": ("gpt_moe", 2, {"shortcut": "scmoe", "slot": "early"}),
    "ScMoE, experts at the block slot": ("gpt_moe", 1, {"shortcut": "scmoe", "slot": "block"}),
    "gpt_moe converted to DGMoE": ("gpt_moe", 1, {"shortcut": "dgmoe"}),
    "gpt_dense upcycled to ScMoE": ("gpt_dense", 2, {"shortcut": "scmoe", "num_experts": 8}),
    "mixtral converted to ScMoE (Pos-1)": ("mixtral", 2, {"shortcut": "scmoe"}),
}


# every other Hugging Face family of the core issue's zoo and the hand-written blocks, on the 2-rank mesh
OTHER_FAMILIES = {f"{f} (pipelined)": (f, 2) for f in [*sorted(hf_zoo.FAMILIES), *HAND_WRITTEN]
                  if f not in ("mixtral", "qwen2_moe", "switch")}


@pytest.mark.parametrize("mesh_shape", [(2,), (4,), (2, 2)], ids=["ep2", "ep4", "dp2xep2"])
def test_models_match_one_process(mesh_shape, ranks):
    cases = {**MODEL_CASES, **OTHER_FAMILIES} if mesh_shape == (2,) else MODEL_CASES
    results = ranks(math.prod(mesh_shape), f"models {mesh_shape}")
    for name in list(cases) + ["experts that do not divide"]:
        worst = max(r[name] for r in results)
        assert worst < TOL, f"{mesh_shape}: {name}: relative error {worst:.2e}"


def _more_families():
    import transformers
    return {f: (f, 2) for f, (model_cls, _, _) in sorted(hf_families.FAMILIES.items())
            if hasattr(transformers, model_cls)}


def test_more_families_match_one_process(ranks):
    """The 20 further Hugging Face families of the core issue (tests/hf_families.py), on 2 ranks."""
    cases = _more_families()
    results = ranks(2, "more families")
    for name in cases:
        worst = max(r[name] for r in results)
        assert worst < TOL, f"{name}: relative error {worst:.2e}"


def _ddp_case(rank, ws, mesh_shape):
    """docs/design/expert_parallel.md's DDP recipe: DDP over every rank with the expert parameters ignored, the
    expert gradients reduced over "dp" by hand; every gradient must equal one process on the global batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from moecompile.runtime.expert_parallel import expert_parameter_names
    names = ("dp", "ep") if len(mesh_shape) == 2 else ("ep",)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    args, kwargs = _global_batch("gpt_moe", 2 * ws)
    local_args, local_kwargs = _slice((args, kwargs), rank, ws)
    ref = moecompile.optimize(_build("gpt_moe"), args, kwargs)
    _loss(ref(*args, **kwargs)).backward()
    want = dict(ref.named_parameters())
    fast = moecompile.optimize(_build("gpt_moe"), local_args, local_kwargs, mesh=mesh, overlap=2)
    experts = expert_parameter_names(fast)
    DDP._set_params_and_buffers_to_ignore_for_model(fast, experts)
    ddp = DDP(fast)  # kept alive through backward: its reducer averages the rest over all ranks
    _loss(ddp(*local_args, **local_kwargs)).backward()
    for n, p in fast.named_parameters():
        if n in experts:
            if "dp" in names:
                dist.all_reduce(p.grad, group=mesh["dp"].get_group())
            p.grad /= ws
    return max(max_relative_error(p.grad, want[n].grad, p) for n, p in fast.named_parameters())


@pytest.mark.parametrize("mesh_shape", [(2,), (2, 2)], ids=["ep2", "dp2xep2"])
def test_ddp_composition(mesh_shape, ranks):
    worst = max(ranks(math.prod(mesh_shape), f"ddp {mesh_shape}"))
    assert worst < TOL, f"relative error {worst:.2e}"


def _jobs(ws):
    """Every test's job on `ws` ranks, by name: (function, *arguments after rank and world size)."""
    shapes = [(2,)] if ws == 2 else [(4,), (2, 2)]
    jobs = {"runtime": (_runtime_cases, RUNTIME_CASES[ws])}
    for shape in shapes:
        jobs[f"models {shape}"] = (_model_cases, shape, {**MODEL_CASES, **OTHER_FAMILIES} if shape == (2,)
                                   else MODEL_CASES)
    if ws == 2:
        jobs["more families"] = (_model_cases, (2,), _more_families())
    for shape in [(2,)] if ws == 2 else [(2, 2)]:
        jobs[f"ddp {shape}"] = (_ddp_case, shape)
    return jobs


@pytest.fixture(scope="module")
def ranks():
    """ranks(ws, job) → each rank's result of that job, every job of `ws` ranks run in one spawn the first
    time one of them is asked for (each job builds its own meshes, models and data from seeds)."""
    done = {}

    def result(ws, job):
        if ws not in done:
            per_rank = run_ranks(run_jobs, ws, _jobs(ws))
            done[ws] = {name: [r[name] for r in per_rank] for name in per_rank[0]}
        return done[ws][job]
    return result
