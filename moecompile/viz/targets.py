"""What the command line can load: a TARGET string and example-input shapes → a model and its inputs.

TARGET forms:
    hf:<family>          a tiny random-weight Hugging Face MoE (HF_FAMILIES; needs transformers)
    gpt-moe              moecompile.models.gpt_moe() with small dims (`layers` blocks, MoE every other one)
    pkg.module:factory   factory() from an importable module; needs example-input shapes
    path/to/file.pt2     a program saved by torch.export.save: shown as is, never optimized
Example inputs are "2x16:int64" or "2x16x32" (float32): integers are drawn below the vocabulary of the
model's smallest nn.Embedding (token ids must index it), floats from a normal distribution.
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moecompile.models import gpt_moe

DEFAULT_INPUT = "2x16:int64"
VOCAB = 128


class TargetError(Exception):
    """A mistake in what the user asked for: the command line reports it in one line, exit code 2."""


@dataclass
class Target:
    name: str
    model: nn.Module | None = None          # None for a .pt2 file
    example_inputs: tuple = ()
    exported: torch.export.ExportedProgram | None = None


def _mixtral(layers: int):
    from transformers import MixtralConfig, MixtralForCausalLM
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0,
        max_position_embeddings=64))


def _qwen2_moe(layers: int):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        max_position_embeddings=64))


def _deepseek_v3(layers: int):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    return DeepseekV3ForCausalLM(DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
        kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        max_position_embeddings=64, norm_topk_prob=True))


HF_FAMILIES = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "deepseek_v3": _deepseek_v3}
TARGET_FORMS = (f"hf:<family> ({', '.join(HF_FAMILIES)}), gpt-moe, pkg.module:factory "
                "or a .pt2 file from torch.export.save")


def load(spec: str, example_inputs: list[str] | None = None, layers: int | None = None) -> Target:
    """Build the model named by `spec` (seeded: the same weights every time) with its example inputs."""
    torch.manual_seed(0)
    shapes = [parse_shape(text) for text in example_inputs or [DEFAULT_INPUT]]
    if spec.endswith(".pt2"):
        if not Path(spec).is_file():
            raise TargetError(f"no such file: {spec}")
        try:
            return Target(spec, exported=torch.export.load(spec))
        except Exception as e:  # a corrupt or foreign file is the user's input, not our bug
            raise TargetError(f"cannot load {spec} with torch.export.load: {e}") from None
    if spec.startswith("hf:"):
        family = spec[3:]
        if family not in HF_FAMILIES:
            raise TargetError(f"unknown Hugging Face family {family!r}; built in: {', '.join(HF_FAMILIES)}")
        try:
            model = HF_FAMILIES[family](layers or 2)
        except ImportError:
            raise TargetError(f"{spec} needs transformers: pip install 'moecompile[hf]'") from None
        model.config.use_cache = False  # export cannot return a DynamicCache
    elif spec == "gpt-moe":
        model = gpt_moe(n_layer=layers or 4, n_head=4, d_model=64, d_ff=128, max_seq=64)
    elif re.fullmatch(r"[\w.]+:\w+", spec):
        if not example_inputs:
            raise TargetError(f"{spec} needs --example-input SHAPE[:DTYPE] (e.g. 2x16:int64 or 2x16x32)")
        model = _call_factory(spec)
    else:
        raise TargetError(f"unknown target {spec!r}; expected {TARGET_FORMS}")
    model.eval()  # the graphs shown are the inference graphs: no random dropout masks
    return Target(spec, model, make_inputs(shapes, model))


def _call_factory(spec: str) -> nn.Module:
    module_name, factory_name = spec.split(":")
    if os.getcwd() not in sys.path:  # the console script's path lacks the working directory
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # not only ImportError: the module's own top-level code may raise
        raise TargetError(f"cannot import {module_name!r}: {type(e).__name__}: {e}") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise TargetError(f"{module_name} has no callable {factory_name!r}")
    try:  # checked before the call: a TypeError from inside the factory is not this mistake
        inspect.signature(factory).bind()
    except TypeError as e:
        raise TargetError(f"{spec} needs arguments ({e}); name a factory that takes none, "
                          f"e.g. def build(): return {factory_name}(...)") from None
    except ValueError:  # no signature to check (some builtins): the call itself will tell
        pass
    try:
        model = factory()
    except Exception as e:  # the user's code: its error, not a moecompile traceback
        raise TargetError(f"{spec}() raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise TargetError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def make_inputs(shapes: list[tuple[tuple[int, ...], torch.dtype]], model: nn.Module) -> tuple:
    """One random tensor per (shape, dtype) of parse_shape."""
    embeddings = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    high = min(embeddings, default=2)
    tensors = []
    for shape, dtype in shapes:
        try:
            tensors.append(torch.randn(shape, dtype=dtype) if dtype.is_floating_point
                           else torch.randint(0, high, shape, dtype=dtype))
        except RuntimeError as e:  # too large to allocate, or a dtype randn/randint cannot fill
            raise TargetError(f"cannot make a {'x'.join(map(str, shape))} {dtype} example input: {e}") from None
    return tuple(tensors)


def parse_shape(text: str) -> tuple[tuple[int, ...], torch.dtype]:
    m = re.fullmatch(r"([1-9]\d*(?:x[1-9]\d*)*)(?::(\w+))?", text)  # no 0 dims: nothing to trace
    dtype = getattr(torch, m.group(2) or "float32", None) if m else None
    if not isinstance(dtype, torch.dtype) or dtype.is_complex or dtype == torch.bool:
        raise TargetError(f"bad --example-input {text!r}; expected dims >= 1 joined by x and an optional real dtype, "
                          "e.g. 2x16:int64 or 2x16x32 (float32)")
    return tuple(int(d) for d in m.group(1).split("x")), dtype
