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
