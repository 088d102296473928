"""Runtime: expert-parallel execution (expert_parallel, all_to_all), the cost model, and PEC checkpointing."""


def __getattr__(name):
    # torch.distributed.checkpoint takes half a second to import: only when a checkpointer is asked for
    if name in ("PECCheckpointer", "PLTExceeded"):
        from moecompile.runtime import checkpoint
        return getattr(checkpoint, name)
    if name == "export_checkpoint":
        from moecompile.runtime.export import export_checkpoint
        return export_checkpoint
    raise AttributeError(f"module 'moecompile.runtime' has no attribute {name!r}")
