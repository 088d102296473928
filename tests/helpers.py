"""Equality checks against eager: outputs and every parameter's gradient."""
import torch
from torch.utils._pytree import tree_flatten

from moecompile.validation import max_relative_error


def loss_of(out) -> torch.Tensor:
    """The model's own loss when it returns one, else a fixed random projection of its first output."""
    if getattr(out, "loss", None) is not None:
        return out.loss
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], torch.Tensor) and out[1].dim() == 0:
        return out[1]
    first = tree_flatten(out)[0][0]
    g = torch.Generator().manual_seed(123)
    return (first * torch.randn(first.shape, generator=g)).sum()


def first_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else tree_flatten(out)[0][0]


def assert_same_training_step(eager, fast, args, kwargs, rtol=1e-4):
    """fast(*args) == eager(*args): first output, loss, and the gradient of every parameter."""
    params = dict(eager.named_parameters())  # fast shares these Parameter objects
    results = []
    for m in (eager, fast):
        for p in params.values():
            p.grad = None
        out = m(*args, **kwargs)
        loss = loss_of(out)
        loss.backward()
        results.append((first_output(out).detach(), loss.detach(),
                        {n: None if p.grad is None else p.grad.clone() for n, p in params.items()}))
    (o1, l1, g1), (o2, l2, g2) = results
    assert max_relative_error(o2, o1, o1) < rtol
    assert max_relative_error(l2, l1, l1) < rtol
    for name, p in params.items():
        err = max_relative_error(g2[name], g1[name], p)
        assert err < rtol, f"gradient of {name} differs: relative error {err:.2e}"


def expert_parallel_check(rank: int, ws: int, make) -> tuple[dict[str, float], dict[str, tuple[bool, bool]]]:
    """On rank `rank` of `ws` (run_ranks' gloo ranks): `make()`, optimized with its experts sharded over the
    ranks and run on this rank's batch, against one process running the original on every rank's batch in
    turn (each rank's capacity is its own call's, as the original's would be on that rank). Returns (the
    relative error of the output, of the aux loss when the block returns (out, aux), and of every gradient
    after reduce_gradients, by label; per buffer: (whether this rank's equals what the original's call on this rank's
    batch left, whether their sum over the ranks equals the single process's after all the batches))."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import moecompile
    from moecompile.runtime.expert_parallel import reduce_gradients
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("ep",))
    xs = torch.randn(ws, 2, 12, 32, generator=torch.Generator().manual_seed(1))   # rank r's batch: xs[r]
    cot = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(2))

    def loss(result):
        out, aux = result if isinstance(result, tuple) else (result, torch.zeros(()))
        return (out * cot).mean() + aux, out.detach(), aux.detach()

    torch.manual_seed(0)
    eager = make()
    losses = []
    for r, x in enumerate(xs):
        before = {name: b.clone() for name, b in eager.named_buffers()}
        value, *want = loss(eager(x))
        losses.append(value)
        if r == rank:
            want_out, want_aux = want
            own = {name: b - before[name] for name, b in eager.named_buffers()}
    (sum(losses) / ws).backward()
    torch.manual_seed(0)
    fast = moecompile.optimize(make(), (xs[rank],), mesh=mesh)
    (layer,) = moecompile.explain(fast).moe_layers
    assert layer.rewritten and layer.spec.parallel is not None, layer.reason
    value, out, aux = loss(fast(xs[rank]))
    value.backward()
    reduce_gradients(fast, mesh)
    errors = {"output": max_relative_error(out, want_out, want_out), "aux": max_relative_error(aux, want_aux, want_aux)}
    local = layer.spec.parallel.local_experts
    for name, p in fast.named_parameters():
        g = dict(eager.named_parameters())[name].grad
        g = g if g.shape == p.shape else g[local.start:local.stop]
        errors[f"gradient of {name}"] = max_relative_error(p.grad, g, g)
    buffers = {}
    for name, b in fast.named_buffers():
        total = b.clone()
        dist.all_reduce(total)
        buffers[name] = (torch.equal(b, own[name]), torch.equal(total, dict(eager.named_buffers())[name]))
    return errors, buffers


def run_jobs(rank: int, ws: int, jobs: dict) -> dict:
    """A run_ranks target running several tests' jobs ({name: (fn, *args)}) in turn on the same ranks → {name:
    fn(rank, ws, *args)}: one spawn (a process and `import torch` per rank, seconds each) for all of them."""
    return {name: fn(rank, ws, *args) for name, (fn, *args) in jobs.items()}
