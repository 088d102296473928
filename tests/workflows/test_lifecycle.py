"""An optimized model's life as users live it: inspected and trained by Hugging Face's Trainer, pickled and
torch.save'd, deep-copied, optimized again. Before and after its first call it must behave as the model
it came from (compiling has no effect the user can observe except speed)."""
import copy
import inspect
import io
import pickle
import warnings

import pytest
import torch

import moecompile
from moecompile.validation import max_relative_error
from tests import hf_zoo
from tests.helpers import first_output, loss_of
from tests.workflows import families
from tests.workflows.families import batch, make

HF = ["mixtral", "qwen2_moe", "deepseek_v2"]


def rewritten(model) -> int:
    return families.rewritten(model)[0]


def assert_same_outputs(model, eager, family, seeds=(1, 2)):
    for seed in seeds:
        args, kwargs = batch(family, seed=seed)
        with torch.no_grad():
            got, want = model(*args, **kwargs), eager(*args, **kwargs)
        assert max_relative_error(first_output(got), first_output(want), first_output(want)) < 1e-4
        assert max_relative_error(loss_of(got), loss_of(want), loss_of(want)) < 1e-4


# ---- the forward signature ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", [*HF, "gpt_moe"])
def test_forward_presents_the_models_signature_before_and_after_the_first_call(family):
    eager = make(family)
    fast = moecompile.optimize(eager)
    want = inspect.signature(eager.forward)
    assert inspect.signature(fast.forward) == want          # what Trainer reads to keep dataset columns
    assert fast.forward.__name__ == "forward" and fast.forward.__doc__ == eager.forward.__doc__
    assert fast.forward.__wrapped__ == type(eager).forward.__get__(fast)  # functools.wraps-style
    args, kwargs = batch(family)
    fast(*args, **kwargs)
    assert inspect.signature(fast.forward) == want
    block = next(fast.get_submodule(m.name) for m in moecompile.explain(fast).moe_layers if m.rewritten)
    original = eager.get_submodule(moecompile.explain(fast).moe_layers[0].name)
    assert inspect.signature(block.forward) == inspect.signature(original.forward)  # rewritten blocks too


# ---- Hugging Face Trainer -------------------------------------------------------------------------------
def _dataset(n=12, seq=10):
    g = torch.Generator().manual_seed(7)
    return [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(1, hf_zoo.V, (n, seq), generator=g)]


def _train(model, tmp_path, **args):
    """3 Trainer steps; every micro-batch's loss (unrounded) and the final parameters."""
    from transformers import Trainer, TrainingArguments
    losses = []

    class Recording(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(loss.detach().clone())
            return loss

    training = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                                 learning_rate=1e-3, report_to=[], use_cpu=True, seed=0, save_strategy="no",
                                 logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, **args)
    Recording(model=model, args=training, train_dataset=_dataset()).train()
    return torch.stack(losses), {n: p.detach().clone() for n, p in model.named_parameters()}


TRAINER_CASES = [("mixtral", "lazy", {}), ("mixtral", "example", {"gradient_accumulation_steps": 2}),
                 ("qwen2_moe", "lazy", {"gradient_accumulation_steps": 2}),
                 ("qwen2_moe", "example", {"gradient_checkpointing": True}),
                 ("deepseek_v2", "lazy", {"gradient_accumulation_steps": 2, "gradient_checkpointing": True}),
                 # accelerate wraps the (still lazy) forward in bf16 autocast: the wrapper must outlive the first call
                 ("mixtral", "lazy", {"bf16": True})]


@pytest.mark.slow
@pytest.mark.parametrize("family,how,args", TRAINER_CASES,
                         ids=[f"{f}-{h}-" + ("-".join(a) or "plain") for f, h, a in TRAINER_CASES])
def test_trainer_trains_the_optimized_model_as_the_original(family, how, args, tmp_path):
    want_losses, want_params = _train(make(family), tmp_path / "eager", **args)
    model = make(family)
    if how == "lazy":
        fast = moecompile.optimize(model)
    else:
        batch = torch.stack([row["input_ids"] for row in _dataset()[:2]])
        fast = moecompile.optimize(model, (batch,), {"labels": batch})
    losses, params = _train(fast, tmp_path / "fast", **args)
    assert rewritten(fast) == len(moecompile.explain(fast).moe_layers) > 0
    assert len(losses) == len(want_losses) == 3 * args.get("gradient_accumulation_steps", 1)
    assert max_relative_error(losses, want_losses, want_losses) < 1e-4
    assert params.keys() == want_params.keys()
    for name, p in params.items():  # relative to the weights' scale (initializer_range): a parameter that
        # starts at 0 and has a gradient of rounding noise only (k_proj.bias: softmax ignores it) moves by ±lr
        # per Adam step in both runs, whatever the noise
        assert max_relative_error(p, want_params[name], want_params[name], floor=0.02) < 1e-4, name


# ---- pickle, torch.save, deepcopy -----------------------------------------------------------------------
def _pickle(model):
    return pickle.loads(pickle.dumps(model))


def _torch_save(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


ROUND_TRIPS = {"pickle": _pickle, "torch.save": _torch_save, "deepcopy": copy.deepcopy}


@pytest.mark.parametrize("family,trip", [("mixtral", "pickle"), ("qwen2_moe", "torch.save"),
                                         ("deepseek_v2", "deepcopy"), ("gpt_moe", "torch.save")])
def test_lazy_model_round_trips_and_compiles_at_its_first_call(family, trip):
    eager = make(family)
    loaded = ROUND_TRIPS[trip](moecompile.optimize(eager))
    assert inspect.signature(loaded.forward) == inspect.signature(eager.forward)
    assert moecompile.explain(loaded).moe_layers == []  # not compiled yet
    assert_same_outputs(loaded, eager, family)
    assert rewritten(loaded) == len(moecompile.explain(loaded).moe_layers) > 0


@pytest.mark.parametrize("family", [*HF, "gpt_moe"])
def test_compiled_model_round_trips_with_its_blocks_rewritten(family):
    eager = make(family)
    args, kwargs = batch(family)
    fast = moecompile.optimize(eager, args, kwargs)
    n = rewritten(fast)
    assert n == len(moecompile.explain(fast).moe_layers) > 0
    for trip, round_trip in ROUND_TRIPS.items():
        loaded = round_trip(fast)
        assert rewritten(loaded) == n, trip
        for layer in moecompile.explain(loaded).moe_layers:  # its blocks run the rewrite, not the original code
            block = loaded.get_submodule(layer.name)
            assert "forward" in vars(block) and block.forward.spec is layer.spec, trip
        assert_same_outputs(loaded, eager, family, seeds=(1,))
        with torch.no_grad():  # the loaded model owns its parameters (a copy), as any unpickled model
            next(loaded.parameters()).add_(1.0)
    assert_same_outputs(fast, eager, family, seeds=(2,))


def test_set_routing_reaches_the_blocks_of_a_loaded_model():
    eager = make("mixtral")
    args, kwargs = batch("mixtral")
    fast = moecompile.optimize(eager, args, kwargs)
    loaded = _torch_save(fast)
    moecompile.set_routing(loaded, top_k=1)
    moecompile.set_routing(fast, top_k=1)
    with torch.no_grad():
        top1, want, top2 = loaded(*args, **kwargs).logits, fast(*args, **kwargs).logits, eager(*args, **kwargs).logits
    assert max_relative_error(top1, want, want) < 1e-6 and max_relative_error(top1, top2, top2) > 1e-3


# ---- optimize() of an optimized model -------------------------------------------------------------------
AGAIN_CASES = [("mixtral", "lazy", "lazy"), ("mixtral", "lazy", "example"), ("mixtral", "called", "lazy"),
               ("mixtral", "compiled", "lazy"), ("mixtral", "compiled", "example"),
               ("qwen2_moe", "compiled", "lazy"), ("qwen2_moe", "lazy", "example"),
               ("deepseek_v2", "called", "lazy"), ("deepseek_v2", "lazy", "lazy"), ("gpt_moe", "compiled", "example")]


@pytest.mark.parametrize("family,first,again", AGAIN_CASES, ids=["-".join(c) for c in AGAIN_CASES])
def test_optimizing_an_optimized_model_keeps_its_blocks_rewritten(family, first, again):
    """first: the model given is lazy (not yet called), lazy and called once, or compiled from example
    inputs; again: optimize() of it without or with example inputs."""
    eager = make(family)
    args, kwargs = batch(family)
    fast = moecompile.optimize(eager, args, kwargs) if first == "compiled" else moecompile.optimize(eager)
    if first == "called":
        fast(*args, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same options: nothing to warn about
        twice = moecompile.optimize(fast) if again == "lazy" else moecompile.optimize(fast, args, kwargs)
    assert inspect.signature(twice.forward) == inspect.signature(eager.forward)
    assert_same_outputs(twice, eager, family, seeds=(1,))
    report = moecompile.explain(twice)
    assert [m.name for m in report.moe_layers] == [m.name for m in moecompile.explain(fast).moe_layers]
    assert rewritten(twice) == len(report.moe_layers) > 0, str(report)
    assert any("already optimized by moecompile" in note for note in report.notes), report.notes
    for layer in report.moe_layers:
        assert "forward" in vars(twice.get_submodule(layer.name))


def test_optimizing_again_with_other_options_says_they_were_not_applied():
    eager = make("mixtral")
    args, kwargs = batch("mixtral")
    fast = moecompile.optimize(eager, args, kwargs)
    with pytest.warns(UserWarning, match="kernels='reference'"):
        twice = moecompile.optimize(fast, kernels="reference")
    assert any("not applied: kernels='reference'" in note for note in moecompile.explain(twice).notes)
    assert {k for m in moecompile.explain(twice).moe_layers for k in m.spec.kernels.values()} == {"native"}
