"""GPT-NeoX config compatibility: what each GPT-NeoX key that is not a key of this schema means here.

A GPT-NeoX YAML must either build exactly the model GPT-NeoX builds, or be refused naming the key, the value and
what to write instead. Keys shared with the schema are implemented (the schema documents them). Every other key of
GPT-NeoX's `neox_args` reference is in `TABLE`, with one of three outcomes decided by its value:

  no-op    the value is what this trainer does anyway: accepted, with one info line saying why it changes nothing;
  mapped   translated into this schema's keys (precision spellings, the pre-SwiGLU intermediate_size, ...);
  refused  the value asks for something this trainer does not do: a ConfigIssue naming the alternative.

The table is data; `translate` applies it to the merged mapping before schema validation, and `render_table` writes
the GPT-NeoX section of docs/config.md from it and the schema (a test keeps the committed file in sync).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Optional

from megatron.config.errors import _UNSET, ConfigIssue

ANY = object()  # every value is a no-op
OFF = object()  # false / null / 0 / empty are no-ops (GPT-NeoX's defaults for optional features)


@dataclass(frozen=True)
class Compat:
    ok: Any  # ANY, OFF, or a tuple of values that are no-ops here
    why: str  # why those values change nothing here
    instead: str = ""  # for other values: what to do instead (the issue's fix); empty = never refused

    def accepts(self, value: Any) -> bool:
        if self.ok is ANY:
            return True
        if self.ok is OFF:
            return value in (False, None, 0, "", [], {}) or value == "none"
        return value in self.ok


def _off(why: str, instead: str) -> Compat:
    return Compat(OFF, why, instead)


_FUSION = "a kernel choice; the maths is the same (here: attention_backend and fuse_pointwise)"
_RUNTIME = "set by GPT-NeoX itself at run time, not a setting; ignored"
_LAUNCH_SET = "GPT-NeoX's launcher fills it in; deepy.py and the workers work it out themselves"
_NO_MUP = "muP is not implemented; remove it (standard parametrisation, init_method_std)"
_NO_MOE = "mixture-of-experts is not implemented: Llama-3.1 is dense; remove it"
_NO_TE = "Transformer Engine layers are not used (megatron-core's local TP layers are); remove it"
_NO_MAMBA = "Mamba/RWKV blocks are not implemented (Llama-3.1 only); remove it"
_NO_COMET = "Comet is not supported; use use_wandb or tensorboard_dir"

# GPT-NeoX key -> how it is handled here. Keys are written with underscores (hyphens are normalised first).
TABLE: dict[str, Compat] = {
    # ---- model: no-ops at Llama values ----
    "gpt_j_residual": Compat((False,), "the Llama residual (x + attn(norm(x)), then + mlp(norm(x))) is the only one",
                             "set gpt_j_residual: false (parallel attention+MLP is not Llama)"),
    "gpt_j_tied": Compat((False,), "only used with gpt_j_residual", "set gpt_j_tied: false"),
    "output_layer_parallelism": Compat(("column", "row"), "the output layer is split over the vocabulary under TP; "
                                       "row and column give the same model"),
    "scaled_upper_triang_masked_softmax_fusion": Compat(ANY, _FUSION),
    "scaled_masked_softmax_fusion": Compat(ANY, _FUSION),
    "bias_gelu_fusion": Compat(ANY, _FUSION + "; there is no bias or GELU in Llama"),
    "bias_dropout_fusion": Compat(ANY, _FUSION),
    "rope_fusion": Compat(ANY, _FUSION + " (RoPE is fused by fuse_pointwise on GPU)"),
    "layernorm_fusion": Compat(ANY, _FUSION),
    "rmsnorm_fusion": Compat(ANY, _FUSION + " (RMSNorm is fused by fuse_pointwise on GPU)"),
    "use_flashattn_swiglu": Compat(ANY, _FUSION + " (SwiGLU is fused by fuse_pointwise on GPU)"),
    "use_fused_mlp": Compat(ANY, _FUSION),
    "attention_softmax_in_fp32": Compat(ANY, "softmax runs in fp32 inside SDPA's kernels anyway"),
    "apply_query_key_layer_scaling": Compat((False,), "attention is scaled by 1/sqrt(head size) only (Llama)",
                                            "set apply_query_key_layer_scaling: false"),
    "fp16_lm_cross_entropy": Compat((False,), "the loss is computed in fp32", "remove it (fp16 is not supported)"),
    "use_cpu_initialization": Compat(ANY, "weights are initialised by a seeded generator independent of device"),
    "init_method_std": Compat(ANY, "schema key"),  # placeholder, removed below (it is a schema key)
    "opt_pos_emb_offset": _off("only for learned position embeddings (OPT)", "remove it: Llama uses rotary"),
    "rpe_num_buckets": Compat(ANY, "only for pos_emb: rpe, which is refused"),
    "rpe_max_distance": Compat(ANY, "only for pos_emb: rpe, which is refused"),
    "layernorm_epsilon": Compat(ANY, "only for norm: layernorm; RMSNorm uses rms_norm_epsilon"),
    "scalenorm_epsilon": Compat(ANY, "only for norm: scalenorm; RMSNorm uses rms_norm_epsilon"),
    "gmlp_attn_dim": Compat(ANY, "only for gMLP attention types, which are refused"),
    "use_qk_layernorm": _off("Llama has no QK norm", "remove it (Llama-3.1 has no QK layernorm)"),
    "num_unique_layers": _off("every layer has its own weights", "remove it (parameter sharing is not supported)"),
    "param_sharing_style": Compat(ANY, "only with num_unique_layers"),
    "sparsity_config": _off("dense attention", "remove it (sparse attention is not supported)"),
    "sliding_window_width": _off("full causal attention (Llama-3.1)", "remove it (sliding-window attention is not "
                                 "supported)"),
    "soft_prompt_tuning": _off("the whole model trains", "remove it (soft prompt tuning is not supported)"),
    "rotary_save_freqs_buffer": Compat(ANY, "RoPE frequencies are recomputed, never saved in checkpoints"),
    "expansion_factor": Compat(ANY, "GPT-NeoX's pre-SwiGLU size as a multiple of hidden_size; mapped to the per-branch "
                               "intermediate_size as with mlp_multiple_of"),
    "mlp_multiple_of": Compat(ANY, "marks intermediate_size as GPT-NeoX's pre-SwiGLU size: each SwiGLU branch gets "
                              "ceil(int(2/3 x size) / 2 / m) x m, which becomes intermediate_size here (LLaMA-7B: "
                              "32768 with 256 -> 11008); a size GPT-NeoX itself cannot build is refused"),
    "identity_mlp": _off("every layer has its MLP", "remove it"),
    # ---- parallelism / runtime ----
    "world_size": Compat(ANY, _LAUNCH_SET),
    "is_pipe_parallel": Compat(ANY, _RUNTIME),
    "local_rank": Compat(ANY, _LAUNCH_SET), "rank": Compat(ANY, _LAUNCH_SET),
    "global_num_gpus": Compat(ANY, _LAUNCH_SET), "user_script": Compat(ANY, _LAUNCH_SET),
    "iteration": Compat(ANY, _RUNTIME), "do_train": Compat(ANY, _RUNTIME), "do_valid": Compat(ANY, _RUNTIME),
    "do_test": Compat(ANY, _RUNTIME), "save_iters": Compat(ANY, _RUNTIME), "git_hash": Compat(ANY, _RUNTIME),
    "padded_vocab_size": Compat(ANY, _RUNTIME + " (computed from vocab_size and make_vocab_size_divisible_by)"),
    "config_files": Compat(ANY, _RUNTIME + " (the resolved config is RUN_DIR/config.yml)"),
    "tensorboard_writer": Compat(ANY, _RUNTIME), "batch_size": Compat(ANY, _RUNTIME + " (= micro batch)"),
    "expert_interval": Compat(ANY, _NO_MOE),
    "lazy_mpu_init": _off("process groups are created eagerly", "remove it"),
    "deepspeed_mpi": Compat(ANY, "workers always read rank and world size from the MPI environment (OMPI_*, PMI_*) "
                            "when mpirun starts them (megatron/parallel/launch_env.py)"),
    "deepscale": Compat(ANY, "deprecated in GPT-NeoX; ignored"), "deepscale_config": Compat(ANY, "deprecated"),
    "onnx_safe": _off("no ONNX export", "remove it"),
    "adlr_autoresume": _off("stop and resume use save_on_signal / exit_duration_in_mins", "use save_on_signal "
                            "(SIGUSR1 from SLURM) or exit_duration_in_mins"),
    "adlr_autoresume_interval": Compat(ANY, "only with adlr_autoresume"),
    "short_seq_prob": Compat(ANY, "only for BERT-style data; ignored"),
    "detect_nvlink_pairs": _off("DeepSpeed's runner sets the visible devices", "remove it"),
    "autotuning_run": _off("no DeepSpeed autotuning", "remove it; planning is tools/plan.py"),
    "autotuning": _off("no DeepSpeed autotuning", "remove it; planning is tools/plan.py"),
    "account": _off("SLURM's account comes from the sbatch script", "put #SBATCH --account=... in the job script "
                    "(docs/multinode.md)"),
    # ---- optimizer / schedule (DeepSpeed-style keys) ----
    "optimizer_type": Compat(("adam", "Adam"), "the optimizer is AdamW (optimizer.type)",
                             "use optimizer: {type: Adam} (only Adam/AdamW are supported)"),
    "use_bnb_optimizer": _off("plain AdamW", "remove it (bitsandbytes optimizers are not supported)"),
    "zero_stage": Compat((1, None), "ZeRO stage 1 (zero_optimization.stage)", "use zero_optimization: {stage: 1}"),
    "zero_reduce_scatter": Compat(ANY, "use zero_optimization.reduce_scatter"),
    "zero_contiguous_gradients": Compat(ANY, "use zero_optimization.contiguous_gradients"),
    "zero_reduce_bucket_size": Compat(ANY, "use zero_optimization.reduce_bucket_size"),
    "zero_allgather_bucket_size": Compat(ANY, "use zero_optimization.allgather_bucket_size"),
    "lr": Compat(ANY, "mapped to optimizer.params.lr when that is unset"),
    "lr_decay_fraction": _off("lr decays over lr_decay_iters", "set lr_decay_iters = fraction x train_iters"),
    "use_checkpoint_lr_scheduler": Compat(ANY, "a resume takes the schedule from the checkpoint unless "
                                          "override_lr_scheduler: true (its default is this key's true)"),
    "scheduler": _off("the schedule is lr_decay_style / warmup / min_lr", "remove it; set lr_decay_style, warmup, "
                      "min_lr"),
    "fp32_allreduce": Compat(ANY, "gradients are reduced in grad_accum_dtype (fp32 by default; data_types)"),
    "prescale_gradients": _off("DeepSpeed's default reduction", "remove it"),
    "gradient_predivide_factor": Compat((1, 1.0, None), "DeepSpeed's default reduction", "remove it"),
    "sparse_gradients": _off("dense gradients", "remove it"),
    "amp": _off("precision is bf16 or fp32", "use precision: bf16"),
    "communication_data_type": Compat((None, "fp32"), "gradients are communicated in grad_accum_dtype (fp32)",
                                      "remove it; set data_types: {grad_accum_dtype: fp32}"),
    "clip_grad": Compat(ANY, "mapped to gradient_clipping when that is unset"),
    # fp16 loss scaling: only meaningful with fp16, which is refused
    "hysteresis": Compat(ANY, "fp16 loss scaling only"), "dynamic_loss_scale": Compat(ANY, "fp16 loss scaling only"),
    "loss_scale": Compat(ANY, "fp16 loss scaling only"), "loss_scale_window": Compat(ANY, "fp16 loss scaling only"),
    "min_scale": Compat(ANY, "fp16 loss scaling only"),
    # ---- logging / profiling ----
    "steps_per_print": Compat(ANY, "metrics are printed every log_interval steps"),
    "wall_clock_breakdown": Compat(ANY, "mapped to log_phase_times (per-phase times logged with the metrics)"),
    "log_dir": Compat(ANY, "mapped to run_dir when that is unset (config, metrics.jsonl, curves.png go there)"),
    "memory_profiling": _off("no memory snapshot", "use profile_memory_snapshot: true with profile: true"),
    "memory_profiling_path": Compat(ANY, "the memory snapshot goes to RUN_DIR/profile/"),
    "profile_backward": _off("profiling is profile / profile_step_start / profile_step_stop", "use profile: true"),
    "wandb_host": Compat(ANY, "W&B reads its host from WANDB_BASE_URL / wandb login"),
    "wandb_init_all_ranks": _off("rank 0 logs", "remove it"),
    "wandb_run_name": Compat(ANY, "W&B names the run"),
    "log_grad_pct_zeros": _off("not logged", "remove it"),
    "log_param_norm": _off("not logged", "remove it"),
    "log_grad_norm": Compat(ANY, "the global gradient norm is always logged (train/grad_norm)"),
    "log_optimizer_states": _off("not logged", "remove it"),
    "log_gradient_noise_scale": _off("not logged", "remove it"),
    "gradient_noise_scale_n_batches": Compat(ANY, "only with log_gradient_noise_scale"),
    "gradient_noise_scale_cpu_offload": Compat(ANY, "only with log_gradient_noise_scale"),
    "use_comet": _off("not used", _NO_COMET), "comet_workspace": Compat(ANY, _NO_COMET),
    "comet_project": Compat(ANY, _NO_COMET), "comet_experiment_name": Compat(ANY, _NO_COMET),
    "comet_tags": Compat(ANY, _NO_COMET), "comet_others": Compat(ANY, _NO_COMET),
    "dump_state": _off("not dumped", "remove it"),
    "flops_profiler": _off("FLOPs are logged (TFLOP/s/GPU)", "remove it"),
    "tensorboard": _off("use tensorboard_dir", "use tensorboard_dir"), "wandb": _off("use use_wandb", "use use_wandb"),
    "csv_monitor": _off("metrics go to RUN_DIR/metrics.jsonl", "remove it"),
    "comms_logger": _off("not logged", "remove it"),
    # ---- activation checkpointing ----
    "synchronize_each_layer": Compat(ANY, "DeepSpeed-internal synchronisation; no effect on the result"),
    "contiguous_checkpointing": _off("DeepSpeed's default", "remove it"),
    "checkpoint_in_cpu": _off("activations stay on the GPU", "remove it (CPU activation offload is not supported)"),
    "deepspeed_activation_checkpointing": Compat(ANY, "checkpoint_activations uses DeepSpeed's implementation"),
    "activation_checkpointing": _off("use checkpoint_activations / partition_activations", "use "
                                     "checkpoint_activations and partition_activations"),
    "checkpoint_scale": Compat(("linear",), "checkpoints at every checkpoint_factor steps",
                               "use checkpoint_factor and extra_save_iters"),
    "checkpoint_validation_with_forward_pass": Compat((False,), "resume exactness is covered by the tests",
                                                      "remove it (not implemented)"),
    "no_save_optim": Compat((False,), "checkpoints hold the optimizer state (needed to resume)", "remove it"),
    "no_save_rng": Compat((False,), "checkpoints hold the RNG states (exact resume)", "remove it"),
    "no_load_optim": Compat((False,), "a resume loads the optimizer state", "use finetune: true to load weights "
                            "only"),
    "no_load_rng": Compat((False,), "a resume loads the RNG states", "use finetune: true to start a new run"),
    "checkpoint": _off("checkpoints are written by megatron/checkpoint", "remove it"),
    "s3_path": _off("checkpoints stay on the file system", "remove it (copy with your own tools)"),
    "s3_chunk_size": Compat(ANY, "only with s3_path"),
    "use_shared_fs": Compat((True,), "checkpoints are written to one shared file system", "use a shared file "
                            "system for save"),
    # ---- data ----
    "dataset_impl": Compat(("gpt2",), "GPT-style next-token datasets", "remove it (only gpt2-style datasets)"),
    "train_impl": Compat(("normal",), "next-token training (CPT and SFT)", "remove it (DPO/KTO/RM/REINFORCE are "
                         "not implemented)"),
    "allow_chopped": Compat(ANY, "whole-document pack_impl modes cut an over-long conversation at its last message "
                             "end that fits, or drop it, and count both (docs/data.md)"),
    "mmap_warmup": Compat(ANY, "datasets are memory-mapped without a warm-up read"),
    "weight_by_num_documents": _off("blend weights are taken as given (or by size when unset)",
                                    "remove it and leave train_data_weights unset to blend by size"),
    "weighted_sampler_alpha": Compat(ANY, "only with weight_by_num_documents"),
    "merge_file": _off("Llama-3 / HF / sentencepiece tokenizers need no merges file",
                       "GPT-NeoX's GPT2BPETokenizer (vocab.json + merges.txt) is not supported: remove merge_file and "
                       "use tokenizer_type: HFTokenizer with a tokenizer.json (GPT-2's exists), or Llama3Tokenizer"),
    "label_data_paths": _off("use train_label_data_paths", "use train_label_data_paths"),
    "precompute_model_name": _off("not used", "remove it"),
    "char_level_ppl": _off("perplexity is per token", "remove it"),
    "curriculum_learning": _off("no curriculum", "remove it"),
    "curriculum_seqlen": _off("no curriculum", "remove it"),
    "data_efficiency": _off("no DeepSpeed data efficiency", "remove it"),
    "sparse_attention": _off("dense attention", "remove it"),
    "elasticity": _off("fixed world size", "remove it"),
    "compression_training": _off("no compression", "remove it"),
    "deepspeed_extra_args": _off("the DeepSpeed JSON is built from the schema", "remove it"),
    # ---- not implemented: refused when turned on ----
    "use_mup": _off("standard parametrisation", _NO_MUP), "coord_check": _off("not used", _NO_MUP),
    "save_base_shapes": _off("not used", _NO_MUP), "base_shapes_file": _off("not used", _NO_MUP),
    "mup_init_scale": Compat(ANY, _NO_MUP), "mup_attn_temp": Compat(ANY, _NO_MUP),
    "mup_output_temp": Compat(ANY, _NO_MUP), "mup_embedding_mult": Compat(ANY, _NO_MUP),
    "mup_rp_embedding_mult": Compat(ANY, _NO_MUP), "mup_width_scale": Compat(ANY, _NO_MUP),
    "moe_num_experts": Compat((1, None), "dense MLP", _NO_MOE), "moe_type": Compat(ANY, _NO_MOE),
    "moe_top_k": Compat(ANY, _NO_MOE), "moe_min_capacity": Compat(ANY, _NO_MOE),
    "moe_loss_coeff": Compat(ANY, _NO_MOE), "moe_train_capacity_factor": Compat(ANY, _NO_MOE),
    "moe_eval_capacity_factor": Compat(ANY, _NO_MOE), "moe_token_dropping": Compat(ANY, _NO_MOE),
    "moe_use_residual": Compat(ANY, _NO_MOE), "moe_expert_parallel_size": Compat((1, None), "no experts", _NO_MOE),
    "moe_jitter_eps": Compat(ANY, _NO_MOE), "moe_glu": Compat(ANY, _NO_MOE),
    "enable_expert_tensor_parallelism": _off("no experts", _NO_MOE),
    "te_columnparallel": _off("local TP layers", _NO_TE), "te_rowparallel": _off("local TP layers", _NO_TE),
    "te_layernorm_mlp": _off("local TP layers", _NO_TE), "te_mha": _off("local TP layers", _NO_TE),
    "te_fp8_format": Compat(ANY, _NO_TE), "te_fp8_wgrad": Compat(ANY, _NO_TE), "te_fp8_amax_history_len":
    Compat(ANY, _NO_TE), "te_fp8_amax_compute_algo": Compat(ANY, _NO_TE), "te_fp8_margin": Compat(ANY, _NO_TE),
    "te_fp8_mha": _off("no FP8", _NO_TE),
    "mamba_selective_scan_fusion": Compat(ANY, _NO_MAMBA), "mamba_causal_conv_fusion": Compat(ANY, _NO_MAMBA),
    "mamba_inner_func_fusion": Compat(ANY, _NO_MAMBA), "mamba_selective_fp32_params": Compat(ANY, _NO_MAMBA),
    "mamba_use_bias_in_conv": Compat(ANY, _NO_MAMBA), "mamba_use_bias_in_linears": Compat(ANY, _NO_MAMBA),
    "dim_att": Compat(ANY, _NO_MAMBA), "head_size": Compat(ANY, _NO_MAMBA), "ffn_dim": Compat(ANY, _NO_MAMBA),
    "serve_model_weights": _off("not used", "remove it"),
    "dpo_fp32": Compat(ANY, "only with train_impl: dpo"), "dpo_beta": Compat(ANY, "only with train_impl: dpo"),
    "dpo_reference_free": Compat(ANY, "only with train_impl: dpo"),
    "kto_fp32": Compat(ANY, "only with train_impl: kto"), "kto_beta": Compat(ANY, "only with train_impl: kto"),
    "kto_desirable_weight": Compat(ANY, "only with train_impl: kto"),
    "kto_undesirable_weight": Compat(ANY, "only with train_impl: kto"),
    "z_loss": _off("plain cross-entropy", "remove it"),
    **{f"{sign}_{split}{label}_data_paths": _off("not used", "remove it (DPO/KTO pairs are not implemented)")
       for sign in ("pos", "neg") for split in ("train", "valid", "test") for label in ("", "_label")},
    **{f"{split}_reward_data_paths": _off("not used", "remove it (reward-model training is not implemented)")
       for split in ("train", "valid", "test")},
    "use_tutel": _off("no experts", _NO_MOE), "create_moe_param_group": Compat(ANY, _NO_MOE),
    "moe_lbl_in_fp32": Compat(ANY, _NO_MOE),
    "comet_experiment": Compat(ANY, _RUNTIME), "adlr_autoresume_object": Compat(ANY, _RUNTIME),
    "tokenizer": Compat(ANY, _RUNTIME + " (the tokenizer object)"),
    # ---- text generation: text_gen_type, maximum_tokens, ... are schema keys (deepy.py generate.py) ----
    "return_logits": _off("generate.py writes text and token ids", "remove it (logits are not written)"),
    "use_cache": Compat(ANY, "generate.py always keeps a KV cache unless recompute: true"),
}
TABLE.pop("init_method_std")  # a schema key; listed only to keep the model block above readable


# ---------------------------------------------------------------------------------------------------------------
# Mappings: GPT-NeoX spellings that mean one of this schema's keys.
# ---------------------------------------------------------------------------------------------------------------

PRECISION = {"bfloat16": "bf16", "bf16": "bf16", "fp32": "fp32", "float32": "fp32"}
FP16 = ("fp16", "float16", "half")


def neox_swiglu_width(hidden: int, intermediate: Optional[int], expansion: Optional[float],
                      multiple_of: int) -> tuple[int, int]:
    """(width of each SwiGLU branch, width of GPT-NeoX's fused [up; gate] projection) as GPT-NeoX's ParallelMLP
    builds them: its intermediate_size (or expansion_factor x hidden, or 4 x hidden) is the pre-SwiGLU size, two
    thirds of it is the fused projection, rounded up to 2 x mlp_multiple_of; each branch is half of the two thirds,
    rounded up to mlp_multiple_of. GPT-NeoX only works when the fused width is twice the branch width."""
    size = intermediate or (int(expansion * hidden) if expansion else 4 * hidden)
    fused = int(size * 2 / 3)
    branch = fused // 2
    return (multiple_of * -(-branch // multiple_of), 2 * multiple_of * -(-fused // (2 * multiple_of)))


def _map_precision(raw: dict, issue) -> Optional[str]:
    p = raw.get("precision")
    if isinstance(p, str) and p.lower() in PRECISION:
        raw["precision"] = PRECISION[p.lower()]
        return f"precision: {p} -> {raw['precision']}" if p != raw["precision"] else None
    if isinstance(p, str) and p.lower() in FP16:
        issue("precision", "fp16 training is not supported (Llama-3.1 is trained in bf16; loss scaling is not "
              "implemented)", "use precision: bf16 (GPT-NeoX spells it bfloat16; both are accepted)", p)
        raw.pop("precision")
    return None


def _map_fp16_block(raw: dict, issue) -> Optional[str]:
    block = raw.get("fp16")
    if isinstance(block, dict):
        if block.get("enabled"):
            issue("fp16", "fp16 training is not supported (Llama-3.1 is trained in bf16)",
                  "replace the fp16 block with precision: bf16", block)
            raw.pop("fp16")
            return None
        if set(block) - {"enabled"}:
            raw["fp16"] = {"enabled": False}
            return "fp16 block disabled: its loss-scaling keys are ignored"
    return None


def _map_mlp(raw: dict, issue) -> Optional[str]:
    """GPT-NeoX's intermediate_size is the pre-SwiGLU size; here (as in HF config.json) it is each branch's."""
    multiple, expansion = raw.pop("mlp_multiple_of", None), raw.pop("expansion_factor", None)
    mlp_type = raw.pop("mlp_type", None)
    h, size = raw.get("hidden_size"), raw.get("intermediate_size")
    if mlp_type == "llama":
        # GPT-NeoX's earlier LLaMA MLP: SiLU-gated, width 8h/3 rounded up to a multiple of 256.
        if raw.get("activation") in ("silu", "swish", "swiglu", None) and isinstance(h, int) and size is None:
            raw["activation"] = "swiglu"
            raw["intermediate_size"] = 256 * -(-int(2 * h * 4 / 3) // 256)
            return (f"mlp_type: llama -> activation: swiglu, intermediate_size: {raw['intermediate_size']} (per "
                    f"SwiGLU branch, as GPT-NeoX's LLaMA MLP builds it for hidden_size {h})")
        issue("mlp_type", "GPT-NeoX's LLaMA MLP is SiLU-gated with width 8h/3 rounded to 256",
              "use activation: swiglu and intermediate_size (the HF per-branch width) instead of mlp_type", mlp_type)
        return None
    if mlp_type not in (None, "regular"):
        issue("mlp_type", "only the SwiGLU MLP is supported", "remove mlp_type; use activation: swiglu", mlp_type)
    if multiple is None and expansion is None:
        if isinstance(h, int) and isinstance(size, int) and size > 5 * h:
            branch, _ = neox_swiglu_width(h, size, None, 256)
            issue("intermediate_size", f"{size} is {size / h:.1f} x hidden_size: that is GPT-NeoX's pre-SwiGLU size, "
                  "but here (as in HF config.json) intermediate_size is the width of each SwiGLU branch, which "
                  "would build a far larger model", f"write the HF value (LLaMA: {branch}), or keep {size} and add "
                  f"GPT-NeoX's mlp_multiple_of (e.g. 256 gives {branch} per branch)", size)
        return None
    if not isinstance(h, int):
        return None
    if not isinstance(multiple, int) or multiple < 1:
        issue("mlp_multiple_of", "must be a positive integer", "use e.g. mlp_multiple_of: 256", multiple)
        return None
    branch, fused = neox_swiglu_width(h, size, expansion, multiple)
    if fused != 2 * branch:
        issue("intermediate_size,mlp_multiple_of", f"GPT-NeoX itself cannot build this MLP: its fused projection "
              f"would be {fused} wide but its two SwiGLU halves {branch} each",
              f"give the HF per-branch width instead (intermediate_size: {branch}, no mlp_multiple_of)", size)
        return None
    raw["intermediate_size"] = branch
    source = f"intermediate_size: {size}" if size else (f"expansion_factor: {expansion}" if expansion else "4 x "
                                                                                               "hidden_size")
    return (f"{source} with mlp_multiple_of: {multiple} (GPT-NeoX's pre-SwiGLU size) -> intermediate_size: {branch} "
            "per SwiGLU branch (HF's meaning, used here), as GPT-NeoX builds it")


def _map_activation(raw: dict, issue) -> Optional[str]:
    act = raw.get("activation")
    if act in ("silu", "swish"):
        issue("activation", f"{act} without a gate is not Llama's MLP", "use activation: swiglu", act)
        raw.pop("activation")
    return None


def _map_data_impl(raw: dict, issue) -> Optional[str]:
    """GPT-NeoX's default `infer` reads the .bin/.idx pair as mmap, the only format here; `cached` is refused."""
    impl = raw.get("data_impl")
    if impl == "infer":
        raw["data_impl"] = "mmap"
        return "data_impl: infer -> mmap (the .idx files GPT-NeoX infers from are mmap ones)"
    return None


def _map_attention_config(raw: dict, issue) -> Optional[str]:
    """GPT-NeoX's per-layer attention types: global and flash are the same causal attention here (the kernel is
    attention_backend's choice); sparse, local, gMLP, Mamba ... are other models."""
    spec = raw.pop("attention_config", None)
    if spec is None:
        return None
    try:
        kinds = {k for types, _repeat in spec for k in types}
    except (TypeError, ValueError):
        issue("attention_config", "not GPT-NeoX's [[[types], repeat], ...] form", "remove it", spec)
        return None
    other = kinds - {"global", "flash"}
    if other:
        issue("attention_config", f"attention types {sorted(other)} are not supported (Llama uses full causal "
              "attention)", "remove attention_config (or use only global / flash); the kernel is attention_backend",
              spec)
        return None
    return f"attention_config {sorted(kinds)}: full causal attention, kernel chosen by attention_backend"


# Model keys whose GPT-NeoX default builds another model than this trainer's default: a GPT-NeoX config that leaves
# them out means GPT-NeoX's value, so it must say which one it wants.
NEOX_MODEL_DEFAULTS = {
    "norm": ("layernorm", "rmsnorm"),
    "pos_emb": ("learned", "rotary"),
    "activation": ("gelu", "swiglu"),
    "no_weight_tying": (False, True),
    "rms_norm_epsilon": (1.0e-8, 1.0e-5),
}


def _neox_defaults(raw: dict, issue) -> None:
    for key, (neox, ours) in NEOX_MODEL_DEFAULTS.items():
        if key not in raw and not (key == "rms_norm_epsilon" and raw.get("norm") not in (None, "rmsnorm")):
            issue(key, f"not set, and this is a GPT-NeoX config: GPT-NeoX would build {key} {neox!r}, this trainer "
                  f"{ours!r}", f"write {key}: {str(ours).lower() if isinstance(ours, bool) else ours} (Llama's) to "
                  "build the Llama model; GPT-NeoX's default is not supported" if key != "rms_norm_epsilon" else
                  "write rms_norm_epsilon: 1.0e-8 (GPT-NeoX's default) or 1.0e-5 (Llama's)")


def _map_simple(raw: dict, issue) -> list[str]:
    notes = []
    for neox, ours, why in (("log_dir", "run_dir", "logs, metrics and plots"),
                            ("clip_grad", "gradient_clipping", "gradient clipping"),
                            ("wall_clock_breakdown", "log_phase_times", "per-phase times")):
        if neox in raw:
            value = raw.pop(neox)
            if ours in raw or value in (None, False):
                notes.append(f"{neox}: {value!r} ignored ({ours} is {'set' if ours in raw else 'off'})")
            else:
                raw[ours] = value
                notes.append(f"{neox}: {value!r} -> {ours}: {value!r} ({why})")
    lr = raw.pop("lr", None)
    if lr is not None:
        opt = raw.setdefault("optimizer", {}) if isinstance(raw.get("optimizer", {}), dict) else None
        if opt is not None and "lr" not in opt.get("params", {}):
            opt.setdefault("params", {})["lr"] = lr
            notes.append(f"lr: {lr} -> optimizer.params.lr")
    params = raw.get("optimizer", {}).get("params") if isinstance(raw.get("optimizer"), dict) else None
    if isinstance(params, dict) and "weight_decay" in params:
        value = params.pop("weight_decay")
        if "weight_decay" not in raw:
            raw["weight_decay"] = value
            notes.append(f"optimizer.params.weight_decay: {value} -> weight_decay (applied to all but norms)")
        elif raw["weight_decay"] != value:
            issue("optimizer.params.weight_decay", f"{value} contradicts the top-level weight_decay "
                  f"{raw['weight_decay']} (the one GPT-NeoX's parameter groups use)",
                  "keep only the top-level weight_decay", value)
    zero = raw.get("zero_optimization")
    if isinstance(zero, dict):
        for key in ("cpu_offload", "cpu_offload_params", "load_from_fp32_weights", "elastic_checkpoint",
                    "round_robin_gradients"):
            if key in zero:
                value = zero.pop(key)
                if value and key.startswith("cpu_offload"):
                    issue(f"zero_optimization.{key}", "optimizer offload to CPU is not supported",
                          f"remove {key} (ZeRO-1 shards the optimizer states over data parallel instead)", value)
                else:
                    notes.append(f"zero_optimization.{key}: {value!r} is a no-op here")
        for key in ("offload_optimizer", "offload_param"):
            if zero.get(key):
                issue(f"zero_optimization.{key}", "offload is not supported", f"remove {key}", zero.pop(key))
    return notes


MAPPINGS: tuple[Callable, ...] = (_map_precision, _map_fp16_block, _map_mlp, _map_activation, _map_attention_config,
                                  _map_data_impl)


def translate(raw: dict[str, Any], sources: Optional[dict[str, str]] = None,
              schema_keys: Optional[set[str]] = None) -> tuple[dict[str, Any], list[str], list[ConfigIssue]]:
    """Apply the table to a merged mapping (keys already underscored): returns the mapping in this schema's terms,
    the info lines (one per GPT-NeoX key accepted or mapped) and the refusals."""
    raw = copy.deepcopy(raw)  # nested mappings (zero_optimization, fp16) are edited
    sources = sources or {}
    notes: list[str] = []
    issues: list[ConfigIssue] = []

    def issue(key, message, fix, value=_UNSET):
        issues.append(ConfigIssue(key, message, fix, value, sources.get(key.split(",")[0].split(".")[0])))

    schema_keys = schema_keys or set()
    if any(k in TABLE or k in MAPPED_TEXT for k in raw if k not in schema_keys) or raw.get("precision") == "bfloat16":
        _neox_defaults(raw, issue)  # a GPT-NeoX config: its defaults must not silently become ours
    for mapping in MAPPINGS:
        note = mapping(raw, issue)
        if note:
            notes.append(note)
    notes += _map_simple(raw, issue)
    for key in list(raw):
        entry = TABLE.get(key)
        if entry is None or key in schema_keys:
            continue
        value = raw.pop(key)
        if entry.accepts(value):
            notes.append(f"{key}: {value!r} is a no-op here ({entry.why})")
        else:
            issue(key, f"GPT-NeoX key with a value this trainer does not support ({entry.why})",
                  entry.instead or "remove it", value)
    return raw, notes, issues


def status_rows(schema_fields: dict) -> list[tuple[str, str, str]]:
    """(key, status, meaning here) for every GPT-NeoX key: schema keys are implemented (their description), the
    others come from TABLE."""
    rows = [(k, "implemented", SCHEMA_NOTES.get(k, f.description or "").replace("|", "\\|"))
            for k, f in schema_fields.items() if k in NEOX_SCHEMA_KEYS]
    for key, entry in TABLE.items():
        if key in ("mlp_multiple_of", "expansion_factor", "lr", "clip_grad", "log_dir", "wall_clock_breakdown"):
            status = "mapped"
        elif entry.ok is ANY:
            status = "no-op"
        else:
            status = "no-op / refused"
        text = entry.why if not entry.instead else f"no-op when {_ok_text(entry)} ({entry.why}); otherwise refused: "\
            f"{entry.instead}"
        rows.append((key, status, text.replace("|", "\\|")))
    for key, text in MAPPED_TEXT.items():
        rows.append((key, "mapped", text))
    return sorted(rows)


def _ok_text(entry: Compat) -> str:
    if entry.ok is OFF:
        return "off / unset"
    return " or ".join(repr(v) for v in entry.ok)


# Schema keys whose GPT-NeoX spelling or meaning needs a word more than the schema's description.
SCHEMA_NOTES = {
    "precision": "`bf16` / `fp32`; GPT-NeoX's `bfloat16` and `float32` are mapped; `fp16` / `float16` refused "
                 "(Llama-3.1 trains in bf16)",
    "fp16": "`{enabled: false, ...}` accepted (loss-scaling keys ignored); enabled refused: use precision: bf16",
    "intermediate_size": "the width of each SwiGLU branch (HF's meaning). With GPT-NeoX's mlp_multiple_of (or "
                         "expansion_factor) it is read as GPT-NeoX's pre-SwiGLU size and mapped to the branch width "
                         "GPT-NeoX builds; without it, a value over 5 x hidden_size is refused as ambiguous",
    "activation": "`swiglu`; `silu` only with mlp_type: llama (mapped), other activations refused",
    "deepspeed_slurm": "launch with srun (= launcher: slurm); workers map SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS",
    "comment": "passed to srun as `--comment` (through DeepSpeed's --launcher_args); refused with other launchers",
    "data_impl": "`mmap`; GPT-NeoX's default `infer` is mapped to it; `cached` refused",
    "tokenizer_type": "`Llama3Tokenizer`, `HFTokenizer`, `SPMTokenizer`; GPT-NeoX's GPT-2 BPE / char-level / "
                      "tiktoken-by-name types refused. The vocab_file is loaded before launch",
}

MAPPED_TEXT = {
    "attention_config": "`global` / `flash` for every layer: no-op (the kernel is attention_backend's); other types "
                        "refused",
    "mlp_type": "`llama` (with activation `silu`): SwiGLU with GPT-NeoX's LLaMA width 256*ceil(8h/3/256); "
                "`regular` is a no-op; others refused",
}

# GPT-NeoX keys that are also keys of this schema (same name, same meaning unless docs/config.md says otherwise).
NEOX_SCHEMA_KEYS = frozenset("""
pipe_parallel_size model_parallel_size pipe_partition_method sequence_parallel precision num_layers hidden_size
intermediate_size num_attention_heads num_kv_heads seq_length max_position_embeddings norm rms_norm_epsilon pos_emb
no_weight_tying make_vocab_size_divisible_by activation init_method_std rotary_pct rotary_emb_base init_method
output_layer_init_method use_bias_in_norms use_bias_in_attn_linear use_bias_in_mlp
lr_decay_style lr_decay_iters min_lr warmup override_lr_scheduler use_wandb wandb_group wandb_team wandb_project
tensorboard_dir log_interval profile profile_step_start profile_step_stop distributed_backend eod_mask_loss seed
deepspeed_slurm tokenizer_type data_path train_data_paths test_data_paths valid_data_paths train_data_weights
valid_data_weights test_data_weights train_label_data_paths valid_label_data_paths test_label_data_paths data_impl
save load checkpoint_factor extra_save_iters finetune train_iters train_epochs eval_iters keep_last_n_checkpoints
eval_interval split vocab_file num_workers exit_interval attention_dropout hidden_dropout weight_decay
checkpoint_activations checkpoint_num_layers partition_activations reset_position_ids reset_attention_mask
train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps optimizer fp16 bf16 gradient_clipping
zero_optimization data_types hostfile include exclude num_nodes num_gpus master_port master_addr launcher
no_ssh_check force_multi comment pack_impl
text_gen_type temperature top_p top_k maximum_tokens prompt_end sample_input_file sample_output_file num_samples
recompute eval_tasks eval_results_prefix
""".split())


BEGIN, END = "<!-- gpt-neox-keys:begin (generated by `make docs-config`) -->", "<!-- gpt-neox-keys:end -->"


def render_table() -> str:
    """The GPT-NeoX key table of docs/config.md, from the schema and TABLE."""
    from megatron.config.schema import NeoXConfig

    lines = [BEGIN, "", "| GPT-NeoX key | here | meaning here |", "|---|---|---|"]
    lines += [f"| `{k}` | {status} | {text} |" for k, status, text in status_rows(NeoXConfig.model_fields)]
    return "\n".join(lines + ["", END])


def update_doc(path: str) -> bool:
    """Rewrite the generated part of `path`; returns whether it changed."""
    from pathlib import Path

    text = Path(path).read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    new = head + render_table() + tail
    if new != text:
        Path(path).write_text(new)
    return new != text


if __name__ == "__main__":
    import sys

    update_doc(sys.argv[1] if len(sys.argv) > 1 else "docs/config.md")


def handled_keys() -> set[str]:
    """Every GPT-NeoX key this module gives an outcome to (schema keys, the table, the mappings)."""
    return set(TABLE) | set(MAPPED_TEXT) | set(NEOX_SCHEMA_KEYS)
