"""Tiny random-weight Hugging Face MoE models (no downloads), one per family the frontend must handle."""
import torch

V = 128


def mixtral(**overrides):
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0,
               max_position_embeddings=64)
    return MixtralForCausalLM(MixtralConfig(**{**cfg, **overrides}))


def qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        max_position_embeddings=64))


def deepseek_v2():
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
    return DeepseekV2ForCausalLM(DeepseekV2Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=2, n_group=4, topk_group=2, topk_method="group_limited_greedy",
        routed_scaling_factor=2.0, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=64))


def switch(**overrides):
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration
    cfg = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2, num_decoder_layers=2,
               num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=4, expert_capacity=4,
               router_jitter_noise=0.0, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    return SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(**{**cfg, **overrides}))


def deepseek_v3():
    """Sigmoid scoring with a score-correction bias (a buffer), group score = sum of the top-2, renorm."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    return nonzero_biases(DeepseekV3ForCausalLM(DeepseekV3Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
        kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        max_position_embeddings=64, norm_topk_prob=True)))


def gpt_oss(**overrides):
    """Clamped SwiGLU, interleaved gate/up in [in, out] layout, expert and router biases, top-k → softmax."""
    from transformers import GptOssConfig, GptOssForCausalLM
    cfg = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
               max_position_embeddings=64, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
               swiglu_alpha=1.5, swiglu_limit=0.5,  # not the defaults, so a misread constant cannot pass
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return nonzero_biases(GptOssForCausalLM(GptOssConfig(**{**cfg, **overrides})))


def ernie4_5_moe():
    """Renormalization by a sum clamped away from zero, shared experts."""
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM
    return Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, moe_num_experts=8, moe_k=2, moe_num_shared_experts=1,
        moe_layer_start_index=0, moe_layer_end_index=1, moe_layer_interval=1, max_position_embeddings=64))


def cohere2_moe(**overrides):
    """Top-k on raw logits then sigmoid (expert_selection_fn="sigmoid"), shared expert summed."""
    from transformers import Cohere2MoeConfig, Cohere2MoeForCausalLM
    cfg = dict(vocab_size=V, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
               max_position_embeddings=64, sliding_window=8, expert_selection_fn="sigmoid",
               shared_expert_combination_strategy="sum")
    return Cohere2MoeForCausalLM(Cohere2MoeConfig(**{**cfg, **overrides}))


def nonzero_biases(model):
    """Biases start at zero; make them matter so a misread bias cannot pass."""
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("bias") and t.is_floating_point():
                t.normal_(0, 0.1)
    return model


FAMILIES = {"mixtral": mixtral, "qwen2_moe": qwen2_moe, "deepseek_v2": deepseek_v2, "switch": switch,
            "deepseek_v3": deepseek_v3, "gpt_oss": gpt_oss, "ernie4_5_moe": ernie4_5_moe, "cohere2_moe": cohere2_moe}


def inputs(family: str, seed: int = 0):
    """(args, kwargs) for a training call that returns a loss."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (2, 12), generator=g)
    if family == "switch":
        return (), {"input_ids": ids, "labels": torch.randint(1, V, (2, 7), generator=g)}
    return (ids,), {"labels": ids}
