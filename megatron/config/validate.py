"""Cross-field rules, checked before anything launches.

Each rule returns ConfigIssues whose `key` names the key to change (comma-separated when several are involved;
the first one decides which file is named). A rule whose keys already failed type validation is skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from megatron.config.errors import ConfigIssue

if TYPE_CHECKING:
    from megatron.config.schema import NeoXConfig


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def launch_world_size(cfg: "NeoXConfig", available_devices: Optional[int] = None) -> Optional[int]:
    """The number of ranks DeepSpeed's runner will start for this config, by its own rules: hostfile parsing,
    `--include`/`--exclude` filters, then the first `num_nodes` hosts with `num_gpus` slots each (all slots of every
    host when unset). A hostfile this machine cannot read (the job script writes it on the cluster) counts as
    `num_nodes` x `num_gpus` when both are set; otherwise the size is unknown here (None), and the workers check the
    rules against the real world size. Raises ValueError, with DeepSpeed's message, for a malformed hostfile or
    filter."""
    if not (cfg.hostfile or cfg.include or cfg.exclude):
        return cfg.world_size(available_devices)  # one node: what deepy.py passes as --num_gpus, or the GPUs seen
    if cfg.hostfile and not Path(cfg.hostfile).is_file():
        return cfg.world_size() if cfg.num_gpus and cfg.num_nodes > 0 else None
    # DeepSpeed's own functions, imported only here: the import is heavy and single-node configs do not need it.
    from deepspeed.launcher.runner import apply_num_nodes_and_gpus, fetch_hostfile, parse_inclusion_exclusion

    pool = fetch_hostfile(cfg.hostfile) if cfg.hostfile else {"localhost": cfg.num_gpus or available_devices or 1}
    active = parse_inclusion_exclusion(pool, cfg.include or "", cfg.exclude or "")
    active = apply_num_nodes_and_gpus(active, cfg.num_nodes, cfg.num_gpus or -1)
    return sum(len(slots) for slots in active.values())


def _world_size(cfg: "NeoXConfig", available_devices: Optional[int]) -> tuple[Optional[int], list[ConfigIssue]]:
    if (cfg.include or cfg.exclude) and (cfg.num_gpus or cfg.num_nodes > 0):
        return None, [ConfigIssue("include,exclude", "DeepSpeed's runner refuses include/exclude together with "
                                  "num_gpus or num_nodes", "choose the GPUs one way: remove num_gpus and num_nodes, or "
                                  "remove include and exclude", cfg.include or cfg.exclude)]
    try:
        return launch_world_size(cfg, available_devices), []
    except ValueError as e:
        key = "hostfile" if cfg.hostfile and not (cfg.include or cfg.exclude) else "include,exclude,hostfile"
        return None, [ConfigIssue(key, f"DeepSpeed cannot use it: {e}", "write one `HOST slots=GPUS` line per node "
                                  "and filters as HOST[:SLOT,SLOT][@HOST...]", cfg.hostfile)]


def _required(cfg: "NeoXConfig") -> list[ConfigIssue]:
    issues = []
    for key in ("num_layers", "hidden_size", "num_attention_heads", "intermediate_size"):
        if getattr(cfg, key) is None:
            issues.append(
                ConfigIssue(key, "is required", f"set {key} (the Llama presets in configs/ set the model keys)")
            )
    if cfg.train_iters is None and cfg.train_epochs is None:
        issues.append(ConfigIssue("train_iters", "is required (or train_epochs, from which it is derived)",
                                  "set train_iters: N steps, or train_epochs: E epochs of the training data"))
    elif cfg.train_iters is not None and cfg.train_epochs is not None:
        issues.append(ConfigIssue(
            "train_iters,train_epochs", "give the training length once: train_iters or train_epochs, not both",
            "remove train_iters (it is derived from train_epochs) or remove train_epochs", cfg.train_iters))
    return issues


def _model_shape(cfg: "NeoXConfig") -> list[ConfigIssue]:
    if None in (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads):
        return []
    issues = []
    h, nq, nkv = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads
    if h % nq:
        issues.append(ConfigIssue(
            "hidden_size,num_attention_heads", f"hidden_size {h} is not divisible by num_attention_heads {nq}",
            f"pick num_attention_heads among the divisors of {h} that give an even head size", value=h))
    elif (h // nq) % 2:
        issues.append(ConfigIssue(
            "hidden_size,num_attention_heads", f"head size {h // nq} is odd; rotary embeddings need an even one",
            "change hidden_size or num_attention_heads so hidden_size/num_attention_heads is even", value=h))
    if nq % nkv:
        issues.append(ConfigIssue(
            "num_kv_heads", f"num_attention_heads {nq} is not a multiple of num_kv_heads {nkv}",
            f"use num_kv_heads among {_divisors(nq)}", value=nkv))
    if cfg.rotary_pct != 1.0:
        issues.append(ConfigIssue("rotary_pct", "Llama rotates the whole head; partial rotary is not supported",
                                  "set rotary_pct: 1.0", value=cfg.rotary_pct))
    if not cfg.no_weight_tying:
        issues.append(ConfigIssue("no_weight_tying", "tied input/output embeddings are not supported",
                                  "set no_weight_tying: true (Llama-3.1 is untied)", value=False))
    if cfg.use_bias_in_norms:
        issues.append(ConfigIssue("use_bias_in_norms", "RMSNorm has no bias", "set use_bias_in_norms: false", True))
    return issues


def _positions(cfg: "NeoXConfig") -> list[ConfigIssue]:
    issues = []
    if cfg.seq_length > cfg.max_positions:
        issues.append(ConfigIssue(
            "seq_length", f"seq_length {cfg.seq_length} exceeds max_position_embeddings {cfg.max_positions}",
            f"lower seq_length or raise max_position_embeddings to at least {cfg.seq_length}", cfg.seq_length))
    rs = cfg.rope_scaling
    if rs is not None:
        if rs.high_freq_factor <= rs.low_freq_factor:
            issues.append(ConfigIssue(
                "rope_scaling", f"high_freq_factor {rs.high_freq_factor} must exceed low_freq_factor "
                f"{rs.low_freq_factor}", "use the Llama-3.1 values (low 1.0, high 4.0)", rs.model_dump()))
        if rs.original_max_position_embeddings > cfg.max_positions:
            issues.append(ConfigIssue(
                "rope_scaling", f"original_max_position_embeddings {rs.original_max_position_embeddings} exceeds "
                f"max_position_embeddings {cfg.max_positions}",
                "set max_position_embeddings to the scaled context (Llama-3.1: 131072)", rs.model_dump()))
    return issues


def _parallel(cfg: "NeoXConfig", world: Optional[int]) -> list[ConfigIssue]:
    issues = []
    tp, pp = cfg.tp, cfg.pp
    if cfg.num_attention_heads and cfg.num_attention_heads % tp:
        issues.append(ConfigIssue(
            "model_parallel_size", f"num_attention_heads {cfg.num_attention_heads} is not divisible by "
            f"model_parallel_size {tp}", f"use model_parallel_size among {_divisors(cfg.num_attention_heads)}", tp))
    elif cfg.num_attention_heads:
        nkv = cfg.kv_heads
        if nkv % tp and tp % nkv:
            issues.append(ConfigIssue(
                "model_parallel_size", f"num_kv_heads {nkv} and model_parallel_size {tp} must divide one another "
                "(kv heads are split when TP divides them, replicated when TP is a multiple of them)",
                f"use model_parallel_size among {sorted(set(_divisors(nkv)) | {nkv * k for k in range(1, 9)})}", tp))
        elif tp > nkv and cfg.hidden_size and (cfg.hidden_size // cfg.num_attention_heads) % (tp // nkv):
            head, r = cfg.hidden_size // cfg.num_attention_heads, tp // nkv
            issues.append(ConfigIssue(
                "model_parallel_size", f"each kv head is shared by model_parallel_size / num_kv_heads = {r} ranks, "
                f"which split its k/v rows, but the head size {head} is not divisible by {r}",
                f"use model_parallel_size <= {nkv * max(d for d in _divisors(head) if d <= r)} or more kv heads", tp))
    if cfg.intermediate_size and cfg.intermediate_size % tp:
        issues.append(ConfigIssue(
            "model_parallel_size", f"intermediate_size {cfg.intermediate_size} is not divisible by "
            f"model_parallel_size {tp}", f"use model_parallel_size among {_divisors(cfg.intermediate_size)[:12]}", tp))
    if cfg.num_layers and pp > cfg.num_layers:
        issues.append(ConfigIssue(
            "pipe_parallel_size", f"{pp} pipeline stages but only {cfg.num_layers} layers",
            f"use pipe_parallel_size <= {cfg.num_layers}", pp))
    method = cfg.pipe_partition_method
    if not (method in ("parameters", "uniform") or method.startswith("type:")):
        issues.append(ConfigIssue("pipe_partition_method", "unknown partition method",
                                  "use parameters, uniform or type:REGEX", method))
    if cfg.sequence_parallel:
        issues.append(ConfigIssue("sequence_parallel", "sequence parallelism is not implemented yet",
                                  "set sequence_parallel: false", True))
    issues += _launcher(cfg)
    if cfg.recompute_granularity == "selective" and not cfg.checkpoint_activations:
        issues.append(ConfigIssue("recompute_granularity", "selective recompute only applies to checkpointed "
                                  "activations", "set checkpoint_activations: true, or recompute_granularity: full",
                                  "selective"))
    if cfg.recompute_granularity == "selective" and cfg.partition_activations:
        issues.append(ConfigIssue("recompute_granularity", "selective recompute uses torch's checkpoint, which "
                                  "cannot shard the kept activations over TP (partition_activations uses "
                                  "DeepSpeed's)", "set partition_activations: false, or recompute_granularity: full",
                                  "selective"))
    if cfg.attention_dropout and tp > 1:
        # Megatron draws it under a per-TP-rank RNG stream; here every rank has the same generator state, so head i
        # of each rank would get the same mask (a model that depends on TP). Llama trains without dropout.
        issues.append(ConfigIssue("attention_dropout", "attention dropout under tensor parallelism would give each "
                                  "TP rank's heads the same masks", "set attention_dropout: 0 (Llama's), or "
                                  "model_parallel_size: 1", cfg.attention_dropout))
    if cfg.recompute_granularity == "selective" and (cfg.hidden_dropout or cfg.attention_dropout):
        issues.append(ConfigIssue("recompute_granularity", "selective recompute keeps fused attention's output, "
                                  "which on the GPU also drew attention dropout's random numbers; a dropout "
                                  "replayed after it would draw a different mask (wrong gradients)",
                                  "set hidden_dropout: 0 and attention_dropout: 0 (Llama's), or "
                                  "recompute_granularity: full", "selective"))
    if cfg.partition_activations and not cfg.checkpoint_activations:
        issues.append(ConfigIssue("partition_activations", "only applies to checkpointed activations",
                                  "set checkpoint_activations: true, or partition_activations: false", True))
    if world is not None:
        if world % (tp * pp):
            issues.append(ConfigIssue(
                "model_parallel_size,pipe_parallel_size", f"world size {world} is not a multiple of "
                f"model_parallel_size x pipe_parallel_size = {tp} x {pp} = {tp * pp}",
                f"use a world size (num_gpus x num_nodes) that {tp * pp} divides, or change TP/PP", tp))
        else:
            dp = world // (tp * pp)
            expect = cfg.train_micro_batch_size_per_gpu * cfg.gradient_accumulation_steps * dp
            if cfg.train_batch_size is not None and cfg.train_batch_size != expect:
                issues.append(ConfigIssue(
                    "train_batch_size", f"must equal train_micro_batch_size_per_gpu x gradient_accumulation_steps "
                    f"x data-parallel size = {cfg.train_micro_batch_size_per_gpu} x "
                    f"{cfg.gradient_accumulation_steps} x {dp} = {expect}",
                    f"set train_batch_size: {expect}, or remove it to have it derived", cfg.train_batch_size))
    return issues


def _launcher(cfg: "NeoXConfig") -> list[ConfigIssue]:
    """Launch keys that DeepSpeed's runner would refuse (or ignore) only once the job is running."""
    issues = []
    slurm = cfg.deepspeed_slurm or cfg.launcher == "slurm"
    if cfg.num_nodes > 1 and not cfg.hostfile and not slurm:
        issues.append(ConfigIssue("num_nodes,hostfile", f"{cfg.num_nodes} nodes need a hostfile naming them",
                                  "set hostfile: a file with one `HOST slots=GPUS` line per node (or launcher: slurm "
                                  "inside a SLURM job, which takes the nodes from the allocation)", cfg.num_nodes))
    if cfg.comment and not slurm:
        issues.append(ConfigIssue("comment", f"only srun takes a job comment; launcher {cfg.launcher!r} has none",
                                  "remove comment, or launch with launcher: slurm", cfg.comment))
    if cfg.deepspeed_slurm and cfg.launcher not in ("slurm", "pdsh"):
        issues.append(ConfigIssue("deepspeed_slurm,launcher", f"deepspeed_slurm launches with srun, but launcher is "
                                  f"{cfg.launcher!r}", "set launcher: slurm (or remove deepspeed_slurm)", True))
    mpi = cfg.launcher in ("openmpi", "mpich", "mvapich", "impi") and not cfg.deepspeed_slurm
    if mpi and (cfg.include or cfg.exclude):
        issues.append(ConfigIssue("include,exclude", f"DeepSpeed's {cfg.launcher} launcher cannot filter hosts or "
                                  "GPUs", "list only the hosts and slots to use in the hostfile",
                                  cfg.include or cfg.exclude))
    if mpi and cfg.hostfile and Path(cfg.hostfile).is_file() and (cfg.num_gpus or cfg.num_nodes > 0):
        # mpirun starts every slot of every host: num_gpus / num_nodes must describe the hostfile, not filter it.
        from deepspeed.launcher.runner import fetch_hostfile

        try:
            pool = fetch_hostfile(cfg.hostfile) or {}
        except ValueError:
            pool = {}  # reported by the world-size rule
        wrong_gpus = cfg.num_gpus and pool and set(pool.values()) != {cfg.num_gpus}
        wrong_nodes = cfg.num_nodes > 0 and pool and len(pool) != cfg.num_nodes
        if wrong_gpus or wrong_nodes:
            issues.append(ConfigIssue("num_gpus,num_nodes", f"DeepSpeed's {cfg.launcher} launcher starts every slot "
                                      f"of the hostfile ({len(pool)} hosts, slots {sorted(set(pool.values()))}); it "
                                      "cannot use fewer", "remove num_gpus and num_nodes, or write the hostfile with "
                                      "the hosts and slots to use", cfg.num_gpus))
    return issues


def _training(cfg: "NeoXConfig") -> list[ConfigIssue]:
    issues = []
    if cfg.min_lr > cfg.lr:
        issues.append(ConfigIssue("min_lr", f"min_lr {cfg.min_lr} exceeds the peak lr {cfg.lr}",
                                  "set min_lr below optimizer.params.lr (often lr/10)", cfg.min_lr))
    if cfg.fp16 is not None and cfg.fp16.enabled:
        issues.append(ConfigIssue("fp16", "fp16 training is not supported (Llama-3.1 is trained in bf16)",
                                  "use precision: bf16", cfg.fp16.model_dump()))
    if cfg.precision and cfg.bf16 is not None and (cfg.precision == "bf16") != cfg.bf16.enabled:
        issues.append(ConfigIssue("precision,bf16", f"precision {cfg.precision!r} contradicts bf16.enabled "
                                  f"{cfg.bf16.enabled}", "keep one of the two keys", cfg.precision))
    if cfg.zero_optimization.stage == 0:
        # Under stage 0, clipping and the norm are left to DeepSpeed's plain-optimizer path: it reports no norm
        # (logged as 0, so a NaN gradient under a finite loss is never seen by the bad-step guard) and, with pipeline
        # parallelism, leaves every stage but the first out of the clipping norm. bf16 refuses it at start-up anyway.
        issues.append(ConfigIssue("zero_optimization.stage", "ZeRO stage 0 gives no gradient norm (the bad-step "
                                  "guard cannot see NaN gradients) and clips pipeline stages wrongly",
                                  "set zero_optimization: {stage: 1}; with one data-parallel rank it shards nothing, "
                                  "so it is stage 0 with the norm computed right", 0))
    explicit_fp32 = cfg.precision == "fp32" or (cfg.precision is None and cfg.bf16 is not None and not cfg.bf16.enabled)
    if cfg.gradient_accumulation_fusion is True and (explicit_fp32 or cfg.data_types.grad_accum_dtype != "fp32"):
        what = "an fp32 run" if explicit_fp32 else "grad_accum_dtype bf16"
        issues.append(ConfigIssue("gradient_accumulation_fusion", f"fuses weight gradients into the fp32 buffer of "
                                  f"DeepSpeed's bf16 optimizer, which {what} does not have",
                                  "set gradient_accumulation_fusion: false, or precision: bf16 with "
                                  "data_types: {grad_accum_dtype: fp32}", True))
    if cfg.profile and cfg.profile_step_stop < cfg.profile_step_start:
        issues.append(ConfigIssue("profile_step_stop", f"profile_step_stop {cfg.profile_step_stop} is before "
                                  f"profile_step_start {cfg.profile_step_start}",
                                  "set profile_step_stop >= profile_step_start", cfg.profile_step_stop))
    if cfg.lr_decay_iters and cfg.train_iters and cfg.lr_decay_iters > 10 * cfg.train_iters:
        issues.append(ConfigIssue("lr_decay_iters", f"lr_decay_iters {cfg.lr_decay_iters} is more than 10x "
                                  f"train_iters {cfg.train_iters}; the lr would barely decay",
                                  "remove lr_decay_iters to decay over train_iters", cfg.lr_decay_iters))
    return issues


def _data(cfg: "NeoXConfig", check_files: bool = True) -> list[ConfigIssue]:
    issues = []
    if cfg.data_path and cfg.train_data_paths:
        issues.append(ConfigIssue("data_path,train_data_paths", "give either data_path (+ split) or "
                                  "train_data_paths, not both", "remove one of them", cfg.data_path))
    if not cfg.data_path and not cfg.train_data_paths:
        issues.append(ConfigIssue("train_data_paths", "no training data",
                                  "set train_data_paths (or data_path with split)"))
    for kind in ("train", "valid", "test"):
        paths, weights = getattr(cfg, f"{kind}_data_paths"), getattr(cfg, f"{kind}_data_weights")
        if weights is not None and (paths is None or len(paths) != len(weights)):
            issues.append(ConfigIssue(
                f"{kind}_data_weights", f"{len(weights)} weights for {len(paths or [])} {kind}_data_paths",
                f"give one weight per entry of {kind}_data_paths", weights))
        if weights is not None and (any(w < 0 for w in weights) or sum(weights) <= 0):
            issues.append(ConfigIssue(f"{kind}_data_weights", "weights must be non-negative with a positive sum",
                                      "use e.g. [0.7, 0.3]", weights))
        labels = getattr(cfg, f"{kind}_label_data_paths")
        if labels is not None and (paths is None or len(paths) != len(labels)):
            issues.append(ConfigIssue(
                f"{kind}_label_data_paths", f"{len(labels)} label datasets for {len(paths or [])} {kind}_data_paths",
                f"give one label prefix per entry of {kind}_data_paths (data_path + split takes no labels)", labels))
    if cfg.train_label_data_paths and cfg.train_epochs is not None and (
            cfg.resolved_pack_impl == "packed" or cfg.replay is not None):
        issues.append(ConfigIssue(
            "train_label_data_paths,train_epochs", "train_epochs with label datasets counts epochs of whole "
            "conversations: it needs pack_impl best_fit, pack_until_overflow or unpacked, and no replay",
            "remove pack_impl: packed (or replay), or set train_iters instead", cfg.train_epochs))
    try:
        parts = [float(x) for x in cfg.split.replace("/", ",").split(",")]
        if len(parts) != 3 or any(x < 0 for x in parts) or sum(parts) <= 0:
            raise ValueError
    except ValueError:
        issues.append(ConfigIssue("split", "must be three non-negative numbers like 969,30,1",
                                  "write split: 969,30,1", cfg.split))
    issues += _epochs_and_replay(cfg)
    if cfg.tokenizer_type != "Llama3Tokenizer" and not cfg.vocab_file:
        issues.append(ConfigIssue("vocab_file", f"{cfg.tokenizer_type} needs a tokenizer file",
                                  "set vocab_file to tokenizer.json (HFTokenizer) or the .model (SPMTokenizer)"))
    elif cfg.vocab_file and check_files:  # deepy.py loads it once; the workers load it themselves anyway
        issues += _tokenizer_file(cfg)
    return issues


def _tokenizer_file(cfg: "NeoXConfig") -> list[ConfigIssue]:
    """Load the tokenizer file now, as the workers will: a wrong path or type must stop before launch, not inside
    every rank."""
    fix = {"HFTokenizer": "point vocab_file at a Hugging Face tokenizer.json",
           "SPMTokenizer": "point vocab_file at a sentencepiece .model file",
           "Llama3Tokenizer": "point vocab_file at Llama-3's tiktoken tokenizer.model, or remove it to use the bundled "
                              "one"}[cfg.tokenizer_type]
    if not Path(cfg.vocab_file).is_file():
        return [ConfigIssue("vocab_file", "file not found", fix + " (relative paths are relative to the directory "
                            "deepy.py runs in)", cfg.vocab_file)]
    from megatron.data.tokenizer import build_tokenizer

    try:
        build_tokenizer(cfg.tokenizer_type, cfg.vocab_file)
    except Exception as e:  # each library raises its own kind: the message is what matters
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return [ConfigIssue("vocab_file,tokenizer_type", f"cannot be read as a {cfg.tokenizer_type} file: {first}",
                            fix + ", or set tokenizer_type to the kind of file it is (HFTokenizer: tokenizer.json, "
                            "SPMTokenizer: sentencepiece .model, Llama3Tokenizer: tiktoken)", cfg.vocab_file)]
    return []


def _weights_issues(key: str, paths: Optional[list[str]], weights: Optional[list[float]]) -> list[ConfigIssue]:
    issues = []
    if weights is not None and (paths is None or len(paths) != len(weights)):
        issues.append(ConfigIssue(key, f"{len(weights)} weights for {len(paths or [])} data paths",
                                  "give one weight per data path", weights))
    if weights is not None and (any(w < 0 for w in weights) or sum(weights) <= 0):
        issues.append(ConfigIssue(key, "weights must be non-negative with a positive sum", "use e.g. [0.7, 0.3]",
                                  weights))
    return issues


def _epochs_and_replay(cfg: "NeoXConfig") -> list[ConfigIssue]:
    """train_epochs and replay (docs/replay.md): an epoch sees every training document exactly once."""
    issues = []
    if cfg.train_epochs is not None and cfg.train_data_weights is not None:
        issues.append(ConfigIssue(
            "train_data_weights", "with train_epochs every document of train_data_paths is seen once per epoch, so "
            "blend weights cannot apply", "remove train_data_weights (list a path twice to see its documents twice "
            "per epoch)", cfg.train_data_weights))
    replay = cfg.replay
    if replay is None:
        return issues
    if cfg.train_epochs is None:
        issues.append(ConfigIssue(
            "replay,train_epochs", "replay is mixed into each epoch, so the run length must be given in epochs",
            "set train_epochs (e.g. 2.5) instead of train_iters", replay.model_dump()))
    if cfg.data_path and not cfg.train_data_paths:
        issues.append(ConfigIssue(
            "data_path,replay", "replay needs the domain corpus as train_data_paths (data_path + split is not "
            "supported with replay)", "set train_data_paths (and valid_data_paths) instead of data_path",
            cfg.data_path))
    issues += _weights_issues("replay.data_weights", replay.data_paths, replay.data_weights)
    issues += _weights_issues("replay.valid_data_weights", replay.valid_data_paths, replay.valid_data_weights)
    return issues


def _checkpoint(cfg: "NeoXConfig") -> list[ConfigIssue]:
    issues = []
    if cfg.checkpoint_factor and not cfg.save:
        issues.append(ConfigIssue("checkpoint_factor,save", f"checkpoint_factor {cfg.checkpoint_factor} is set but save is not",
                                  "set save: a directory for checkpoints, or remove checkpoint_factor"))
    if cfg.finetune and not cfg.load:
        issues.append(ConfigIssue("finetune,load", "finetune: true needs a checkpoint to start from",
                                  "set load: the checkpoint directory", None))
    return issues


def check_cross_field(cfg: "NeoXConfig", available_devices: Optional[int] = None,
                      world_size: Optional[int] = None) -> list[ConfigIssue]:
    """`world_size`: the real number of ranks, where it is known (in the workers, from the launcher); otherwise it
    is worked out from the config and `available_devices` as DeepSpeed's runner will."""
    world, issues = (world_size, []) if world_size else _world_size(cfg, available_devices)
    return (issues + _required(cfg) + _model_shape(cfg) + _positions(cfg) + _parallel(cfg, world) + _training(cfg)
            + _data(cfg, check_files=world_size is None) + _checkpoint(cfg) + _fp8(cfg, world_size)
            + _mcq_eval(cfg))


def _fp8(cfg: "NeoXConfig", world_size: Optional[int]) -> list[ConfigIssue]:
    """FP8 (megatron/model/fp8.py): torch._scaled_mm needs every GEMM dimension divisible by 16. The library and the
    GPU are checked where the ranks run (the workers know `world_size`): deepy.py and the planner may run on a
    machine without the GPU the config is meant for."""
    if cfg.fp8 is None:
        return []
    from megatron.model import fp8

    issues = []
    if cfg.hidden_size and cfg.num_attention_heads and cfg.intermediate_size and cfg.seq_length:
        dims = fp8.gemm_dims(cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.intermediate_size,
                             cfg.tp, cfg.train_micro_batch_size_per_gpu * cfg.seq_length)
        bad = {name: n for name, n in dims.items() if n % 16}
        if bad:
            # Named with model_parallel_size when a per-rank size is the problem: the planner's layout search
            # (planning.layout_problems) then skips TP sizes that FP8 cannot run at.
            key = "fp8,model_parallel_size" if any("TP rank" in name for name in bad) else "fp8"
            issues.append(ConfigIssue(key, "FP8 GEMMs need every dimension divisible by 16, but "
                                      + ", ".join(f"{k} = {v}" for k, v in bad.items()) + " is not",
                                      "choose sizes (and model_parallel_size) that make them multiples of 16, or "
                                      "remove fp8"))
    if world_size is not None:  # in the workers: this is the device that would run it (not a planning machine)
        problem = fp8.hardware_problem(cfg.fp8.emulate)
        if problem:
            fix = "pip install -r requirements/fp8.txt" if not fp8.available() else \
                "run on a Hopper/Ada GPU, set fp8.emulate: true (torchao's emulation, slow: tests), or remove fp8"
            issues.append(ConfigIssue("fp8.emulate" if fp8.available() else "fp8", problem, fix,
                                      cfg.fp8.emulate if fp8.available() else cfg.fp8.recipe))
    return issues


def _mcq_eval(cfg: "NeoXConfig") -> list[ConfigIssue]:
    """mcq_eval's files are read and checked before launch (a bad row: FILE:LINE), not on every rank later."""
    spec = cfg.mcq_eval
    if spec is None:
        return []
    from megatron.eval.questions import QuestionFileError, read_questions
    from megatron.eval.shots import read_shots

    issues = []
    for key, path, read in (("mcq_eval.questions", spec.questions, read_questions),
                            ("mcq_eval.shots", spec.shots, read_shots)):
        if path is None:
            continue
        try:
            read(path)
        except QuestionFileError as e:
            issues.append(ConfigIssue(key, str(e), "fix the file or point the key at another one", path))
    return issues


# ---------------------------------------------------------------------------------------------------- generation
def _model_to_load(cfg: "NeoXConfig", script: str) -> list[ConfigIssue]:
    if not cfg.load:
        return [ConfigIssue("load", f"{script} needs the model to load", "set load: a checkpoint folder of this "
                            "trainer (a run's save) or a Hugging Face model folder", None)]
    if not Path(cfg.load).exists():
        return [ConfigIssue("load", f"{cfg.load} does not exist", "set load to a checkpoint folder or a Hugging "
                            "Face model folder", cfg.load)]
    return []


def check_eval(cfg: "NeoXConfig") -> list[ConfigIssue]:
    """The rules for `python deepy.py eval.py` (GPT-NeoX's surface for lm-evaluation-harness): a model to load and
    the tasks; the training rules do not apply. Task names are checked against lm-eval's registry by eval.py
    before the model loads."""
    issues = _model_to_load(cfg, "eval.py")
    if not cfg.eval_tasks:
        issues.append(ConfigIssue("eval_tasks", "eval.py needs the tasks to score", "set eval_tasks: [task, ...] "
                                  "or pass --eval_tasks TASK [TASK ...] to deepy.py", cfg.eval_tasks))
    if cfg.eval_include_path and not Path(cfg.eval_include_path).is_dir():
        issues.append(ConfigIssue("eval_include_path", "folder not found", "give the folder holding your task "
                                  "YAMLs", cfg.eval_include_path))
    return issues


def check_generation(cfg: "NeoXConfig") -> list[ConfigIssue]:
    """The rules for `python deepy.py generate.py` (instead of the training rules: the model keys come from the
    checkpoint, data and schedule do not apply). Generation keys that do not apply to the chosen text_gen_type
    are refused rather than silently ignored."""
    issues = _model_to_load(cfg, "generate.py")
    mode = cfg.text_gen_type
    if mode == "input-file":
        if not cfg.sample_input_file:
            issues.append(ConfigIssue("sample_input_file", "text_gen_type input-file needs the prompt file",
                                      "set sample_input_file: a file with one prompt per line", None))
        elif not Path(cfg.sample_input_file).is_file():
            issues.append(ConfigIssue("sample_input_file", "file not found", "check the path",
                                      cfg.sample_input_file))

    def only_for(key: str, value, default, modes: tuple[str, ...]) -> None:
        if value != default and mode not in modes:
            issues.append(ConfigIssue(f"{key},text_gen_type", f"applies to text_gen_type {' or '.join(modes)} only, "
                                      f"not {mode!r}", f"remove {key}, or set text_gen_type: {modes[0]}", value))

    only_for("sample_input_file", cfg.sample_input_file, None, ("input-file",))
    only_for("prompt_end", cfg.prompt_end, "\n", ("input-file",))
    only_for("num_samples", cfg.num_samples, 1, ("unconditional",))
    only_for("sample_output_file", cfg.sample_output_file, None, ("input-file", "unconditional"))
    only_for("hide_reasoning", cfg.hide_reasoning, False, ("interactive",))
    if cfg.temperature == 0 and (cfg.top_p not in (0.0, 1.0) or cfg.top_k):
        issues.append(ConfigIssue("top_p,top_k,temperature", "temperature 0 is greedy decoding: top_p and top_k "
                                  "would do nothing", "set temperature > 0 to sample, or remove top_p / top_k",
                                  {"top_p": cfg.top_p, "top_k": cfg.top_k}))
    if cfg.generation_reasoning and cfg.generation_system_prompt is not None:
        issues.append(ConfigIssue("generation_system_prompt,generation_reasoning", "reasoning mode sets the system "
                                  "prompt to 'detailed thinking on'", "remove one of the two keys",
                                  cfg.generation_system_prompt))
    if cfg.generation_chat is False and (cfg.generation_reasoning or cfg.generation_system_prompt is not None):
        issues.append(ConfigIssue("generation_chat", "generation_system_prompt and generation_reasoning build chat "
                                  "prompts", "remove generation_chat: false, or the chat keys", False))
    if mode == "unconditional" and (cfg.generation_chat or cfg.generation_reasoning
                                    or cfg.generation_system_prompt is not None):
        issues.append(ConfigIssue("text_gen_type", "unconditional samples start from <|begin_of_text|> alone: there "
                                  "is no chat prompt", "use text_gen_type input-file or interactive for chat", mode))
    if cfg.generation_backend == "vllm" and cfg.recompute:
        issues.append(ConfigIssue("recompute,generation_backend", "vLLM always keeps a KV cache",
                                  "remove recompute, or set generation_backend: hf", True))
    return issues
