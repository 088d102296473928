"""find_moe: locate every place the model routes tokens.

Contract:   ctx.model runs once on ctx.args/kwargs (no grad); ctx.sites gets one Site per innermost module
            that executed a top-k-like selection, with the inputs of every enclosing module. ctx.args/kwargs
            are private copies of the caller's inputs, and the run happens in compile_run's context
            (api._compile; frontend/capture.py): whatever the run changes, the caller sees none of it.
Invariants: the model's parameters and outputs are untouched; nothing is rewritten.
Pseudo-code:
    with spy(on=[topk, max.dim, argmax]): model(*args)
    for each selection: sites[innermost module] = (module stack, inputs of each module on the stack)
"""
from moecompile.frontend.capture import find_routing_sites
from moecompile.passes.registry import CompileContext, register_pass


class ModelRaised(RuntimeError):
    """The model's own forward failed on the compilation inputs (its __cause__): often the caller's inputs are
    wrong, not moecompile, so the command line can report it as a mistake in the command."""


@register_pass("find_moe")
def find_moe(ctx: CompileContext) -> None:
    try:
        ctx.sites = find_routing_sites(ctx.model, ctx.args, ctx.kwargs)
    except Exception as e:
        raise ModelRaised(f"moecompile: the model itself raised {type(e).__name__} when run on the inputs "
                          f"given for compilation (the first call's, or example_inputs): {e}") from e
    if not ctx.sites:
        ctx.report.notes.append("no MoE blocks found: the model runs unchanged")
