"""More Hugging Face MoE families (transformers 5.24), as data: (model class, config class, tiny config).

Found by a sweep of transformers' `*moe*` model directories. Families moecompile leaves alone, with a
reason from analysis or validation (never a wrong rewrite), and why:
  phimoe         sparsemixer routing: top-2 built from two masked top-1 picks, custom gradient
  dbrx           expert weights stored flat [E*F, D], reshaped per expert inside forward
  jetmoe         expert outputs concatenated before the activation; an output bias outside the experts
  longcat_flash  "zero experts": the router scores experts that only pass their input through
  llama4         sigmoid after top-k scales the expert *input*; every expert runs on every token
  cohere2_moe    with its default "average" strategy: (routed + shared) / 2 (tests/test_api.py)
Families a transformers release lacks are skipped by the test."""

FAMILIES = {
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=1, max_position_embeddings=64)),
    "olmoe": ("OlmoeForCausalLM", "OlmoeConfig", dict(
        vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=None)),
    "granite_moe": ("GraniteMoeForCausalLM", "GraniteMoeConfig", dict(
        vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        embedding_multiplier=2.0, logits_scaling=2.0, residual_multiplier=0.5, attention_multiplier=0.25)),
    "granite_moe_shared": ("GraniteMoeSharedForCausalLM", "GraniteMoeSharedConfig", dict(
        vocab_size=128, hidden_size=32, intermediate_size=16, shared_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64, embedding_multiplier=2.0, logits_scaling=2.0,
        residual_multiplier=0.5, attention_multiplier=0.25)),
    "mini_max": ("MiniMaxForCausalLM", "MiniMaxConfig", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        router_jitter_noise=0.0, max_position_embeddings=64, block_size=4, layer_types=['linear_attention',
        'full_attention'])),
    "glm4_moe": ("Glm4MoeForCausalLM", "Glm4MoeConfig", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=0,
        norm_topk_prob=True, use_qk_norm=True, max_position_embeddings=64)),
    "hun_yuan_mo_e_v1": ("HunYuanMoEV1ForCausalLM", "HunYuanMoEV1Config", dict(
        vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=4, moe_topk=2, max_position_embeddings=64,
        eod_token_id=2, sep_token_id=3, pad_token_id=0)),
    "flex_olmo": ("FlexOlmoForCausalLM", "FlexOlmoConfig", dict(
        vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
        max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None)),
    "lfm2_moe": ("Lfm2MoeForCausalLM", "Lfm2MoeConfig", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_dense_layers=0, num_experts=8,
        num_experts_per_tok=2, use_expert_bias=True, routed_scaling_factor=1.5, norm_topk_prob=True,
        layer_types=['conv', 'full_attention'], max_position_embeddings=64)),
    "dots1": ("Dots1ForCausalLM", "Dots1Config", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=0, norm_topk_prob=True,
        routed_scaling_factor=2.5, max_position_embeddings=64)),
    "bailing_hybrid": ("BailingHybridForCausalLM", "BailingHybridConfig", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=8, num_local_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=0,
        norm_topk_prob=True, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=64, num_mtp_layers=0, pad_token_id=0,
        layer_group_size=2)),
    "afmoe": ("AfmoeForCausalLM", "AfmoeConfig", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_dense_layers=0, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
        num_experts_per_tok=2, num_shared_experts=1, route_scale=2.0, max_position_embeddings=64,
        sliding_window=8)),
    "exaone_moe": ("ExaoneMoeForCausalLM", "ExaoneMoeConfig", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
        num_shared_experts=1, first_k_dense_replace=0, norm_topk_prob=True, routed_scaling_factor=2.5,
        n_group=2, topk_group=1, max_position_embeddings=64, sliding_window=8)),
    "glm4_moe_lite": ("Glm4MoeLiteForCausalLM", "Glm4MoeLiteConfig", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        mlp_layer_types=['sparse', 'sparse'], max_position_embeddings=64)),
    "glm_moe_dsa": ("GlmMoeDsaForCausalLM", "GlmMoeDsaConfig", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, head_dim=8,
        index_topk=8, index_head_dim=16, index_n_heads=2, mlp_layer_types=['sparse', 'sparse'],
        first_k_dense_replace=0, max_position_embeddings=64)),
    "granite_moe_s_w_a": ("GraniteMoeSWAForCausalLM", "GraniteMoeSWAConfig", dict(
        vocab_size=128, hidden_size=32, intermediate_size=16, shared_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64, sliding_window=8, embedding_multiplier=2.0,
        logits_scaling=2.0, residual_multiplier=0.5, attention_multiplier=0.25)),
    "granite_moe_hybrid": ("GraniteMoeHybridForCausalLM", "GraniteMoeHybridConfig", dict(
        vocab_size=128, hidden_size=32, intermediate_size=16, shared_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64, layer_types=['mamba', 'attention'],
        mamba_n_heads=4, mamba_n_groups=1, mamba_d_state=8, mamba_d_head=16, mamba_d_conv=4, mamba_expand=2,
        mamba_chunk_size=4, embedding_multiplier=2.0, logits_scaling=2.0, residual_multiplier=0.5,
        attention_multiplier=0.25)),
    "mini_max_m2": ("MiniMaxM2ForCausalLM", "MiniMaxM2Config", dict(
        vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=8, num_experts_per_tok=2,
        router_jitter_noise=0.0, max_position_embeddings=64)),
    "qwen3_5_moe": ("Qwen3_5MoeForCausalLM", "Qwen3_5MoeTextConfig", dict(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
        layer_types=['linear_attention', 'full_attention'], max_position_embeddings=64)),
    "qwen3_next": ("Qwen3NextForCausalLM", "Qwen3NextConfig", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, linear_conv_kernel_dim=4, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
        norm_topk_prob=True, layer_types=['linear_attention', 'full_attention'], max_position_embeddings=64)),
}
