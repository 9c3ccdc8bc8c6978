"""The run planner (megatron/planning/, tools/plan.py) against independent references.

* parameter counts: Hugging Face's LlamaForCausalLM built on the meta device from each preset's shapes;
* FLOPs: 6 x (HF parameters that are matmul weights) + 12 L h s, computed here from the HF count;
* where layers go and how many micro-batches are in flight: DeepSpeed's own partitioner and 1F1B schedule;
* activations per layer: the bytes autograd really saves for one TransformerLayer (CPU, fp32 and bf16);
* peak memory: GPU measurements of the trainer in benchmarks/results/memory_measurements.json (within 15%);
* the gradient all-reduce's memory: DeepSpeed's own bucketing code run on CPU;
* step time: DeepSpeed's 1F1B TrainSchedule played out with the stages' compute times;
* the CLI: the AstroSage layout plans and fits; a layout that does not fit gets suggestions that, followed, give
  configs the trainer's validator accepts and that re-plan to the promised memory; bad flags exit 2.
"""

from __future__ import annotations

import importlib.util
import json
import math
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from megatron import planning

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yml"))
MEASUREMENTS = ROOT / "benchmarks" / "results" / "memory_measurements.json"
PRESETS = {"8b": "llama3.1-8b.yml", "70b": "llama3.1-70b.yml", "405b": "llama3.1-405b.yml"}


def load(*names: str) -> planning.Loaded:
    return planning.load_for_planning([str(ROOT / "configs" / n) if "/" not in n else n for n in names])


def cli_main():
    spec = importlib.util.spec_from_file_location("plan_cli", ROOT / "tools" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


# ------------------------------------------------------------------------------------------ parameters and FLOPs
def hf_parameter_count(cfg) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                     num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.kv_heads,
                     intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
                     tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = LlamaForCausalLM(hf)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size", sorted(PRESETS))
def test_parameter_count_is_exact_against_hugging_face(size):
    cfg = load(PRESETS[size]).config
    hf = hf_parameter_count(cfg)
    assert planning.shape_of(cfg).parameter_count() == hf
    # The published sizes, as a second anchor: 8.03B, 70.55B, 405.85B.
    assert {"8b": 8_030_261_248, "70b": 70_553_706_496, "405b": 405_853_388_800}[size] == hf


def test_flops_per_step_follow_the_6n_plus_12lhs_convention():
    cfg = load("astrosage70b_cpt.yml").config
    plan = planning.make_plan(cfg, gpu="mi250x")
    L, h, s, V = cfg.num_layers, cfg.hidden_size, cfg.seq_length, cfg.vocab_size
    # Matmul weights = all parameters minus the norms and the embedding table (a lookup, not a matmul).
    n_matmul = hf_parameter_count(cfg) - (2 * L + 1) * h - V * h
    assert plan.flops_per_token == 6 * n_matmul + 12 * L * h * s
    assert plan.tokens_per_step == 512 * 8192
    assert plan.bubble == pytest.approx(7 / 23)
    # Checkpointing recomputes each layer's forward: a third of the layers' share of 6N + 12Lhs again.
    layer_matmuls = n_matmul - V * h
    recompute = 1 + (2 * layer_matmuls + 4 * L * h * s) / plan.flops_per_token
    # GPU work / (GPUs x sustained TFLOP/s), shared out over the stages (the step time, bubble and imbalance
    # included, is checked against DeepSpeed's schedule below).
    assert plan.compute_seconds == pytest.approx(plan.flops_per_step * recompute / (2048 * 0.40 * 191.5e12))
    assert sum(plan.stage_flops_per_token()) == pytest.approx(plan.flops_per_token * recompute)
    assert plan.end_to_end_tflops == pytest.approx(plan.flops_per_step / plan.step_seconds / 2048 / 1e12)


# ------------------------------------------------------------------------------------------ DeepSpeed's pipeline
@pytest.mark.parametrize("layers,stages", [(80, 8), (126, 8), (32, 3), (4, 2), (2, 4)])
@pytest.mark.parametrize("method", ["type:transformer", "parameters", "uniform"])
def test_stages_hold_the_layers_deepspeed_gives_them(layers, stages, method):
    from deepspeed.runtime.utils import partition_balanced, partition_uniform

    shape = planning.Shape(layers=layers, hidden=64, heads=4, kv_heads=2, ffn=192, vocab=1000, vocab_multiple=128,
                           seq=16)
    items = ["embedding"] + ["layer"] * layers + ["final_norm", "output"]
    if method == "uniform":
        bounds = partition_uniform(len(items), stages)
    elif method == "parameters":
        vp = shape.padded_vocab(1)
        sizes = {"embedding": vp * 64, "output": vp * 64, "final_norm": 64,
                 "layer": shape.attn_params() + shape.mlp_params() + 128}
        bounds = partition_balanced([sizes[i] for i in items], stages)
    else:
        bounds = partition_balanced([1 if i == "layer" else 0 for i in items], stages)
    expect = [items[bounds[p]:bounds[p + 1]] for p in range(stages)]
    assert planning.stage_items(shape, 1, stages, method) == expect


@pytest.mark.parametrize("stages,micro_batches", [(8, 16), (4, 2), (3, 7), (1, 8)])
def test_in_flight_micro_batches_follow_deepspeeds_1f1b_schedule(stages, micro_batches):
    from deepspeed.runtime.pipe.schedule import BackwardPass, ForwardPass, TrainSchedule

    for stage in range(stages):
        live = most = 0
        for step in TrainSchedule(micro_batches=micro_batches, stages=stages, stage_id=stage).steps():
            for cmd in step:
                live += isinstance(cmd, ForwardPass) - isinstance(cmd, BackwardPass)
                most = max(most, live)
        shape = planning.Shape(layers=stages, hidden=64, heads=4, kv_heads=2, ffn=192, vocab=1000,
                               vocab_multiple=128, seq=16)
        layout = planning.Layout(tp=1, pp=stages, dp=1, micro=1, gas=micro_batches, checkpoint=False)
        _, _, mem = planning.plan_memory(shape, layout, planning.Precision("bf16", "fp32", 1))
        assert mem[stage].in_flight == most, f"stage {stage}"


def test_the_last_stage_keeps_a_micro_batchs_logits_through_its_whole_backward():
    """DeepSpeed's _exec_backward_pass runs the loss's backward on the last stage and returns before the line that
    frees pipe_buffers['outputs'] (the logits): while that stage's layers run their backward, the current
    micro-batch's logits are alive beside the stale ones of the previous micro-batch (which `acts` holds)."""
    import inspect

    from deepspeed.runtime.pipe.engine import PipelineEngine

    source = inspect.getsource(PipelineEngine._exec_backward_pass)
    last_stage = source.index("if self.is_last_stage():")
    assert source.index("return", last_stage) < source.index("self.pipe_buffers['outputs'][buffer_id] = None")

    cfg = load("astrosage70b_cpt.yml").config  # stage 7: 10 layers + output, as stage 6 has 10 layers
    plan = planning.make_plan(cfg, gpu="mi250x")
    middle, last = plan.stages[6], plan.stages[7]
    assert last.peak_phase == middle.peak_phase == "backward of a layer (recomputed)"
    sbh, logits = cfg.seq_length * cfg.hidden_size, cfg.seq_length * plan.shape.padded_vocab(8) // 8  # micro-batch 1
    # the same layer backward, less the receive buffer for a gradient (the last stage gets none), plus the logits
    assert last.transient == middle.transient - 2 * sbh + 2 * logits


def schedule_makespan(fwd: list[float], bwd: list[float], micro_batches: int) -> float:
    """How long DeepSpeed's TrainSchedule takes when stage i's forward and backward of a micro-batch take fwd[i]
    and bwd[i] seconds: every stage runs its own command list in order, and a send and its matching receive
    (blocking p2p) finish together once both stages have reached them."""
    from deepspeed.runtime.pipe import schedule as S

    stages = len(fwd)
    programs = [[c for step in S.TrainSchedule(micro_batches=micro_batches, stages=stages, stage_id=i).steps()
                 for c in step] for i in range(stages)]
    partner = {S.SendActivation: (1, S.RecvActivation), S.RecvActivation: (-1, S.SendActivation),
               S.SendGrad: (-1, S.RecvGrad), S.RecvGrad: (1, S.SendGrad)}
    pc, clock = [0] * stages, [0.0] * stages
    while any(pc[i] < len(programs[i]) for i in range(stages)):
        progressed = False
        for i in range(stages):
            while pc[i] < len(programs[i]):
                cmd = programs[i][pc[i]]
                if type(cmd) in partner:
                    step, kind = partner[type(cmd)]
                    j = i + step
                    if pc[j] >= len(programs[j]) or not isinstance(programs[j][pc[j]], kind):
                        break  # wait for the other stage to reach the matching command
                    clock[i] = clock[j] = max(clock[i], clock[j])
                    pc[j] += 1
                else:
                    clock[i] += fwd[i] if isinstance(cmd, S.ForwardPass) else \
                        bwd[i] if isinstance(cmd, S.BackwardPass) else 0.0
                pc[i] += 1
                progressed = True
        assert progressed, "the schedule deadlocked"
    return max(clock)


def stage_seconds_by_hand(cfg, plan) -> tuple[list[float], list[float]]:
    """Forward and backward time of one micro-batch per stage, from DeepSpeed's partition of the layer specs:
    a layer's forward is 2 N_layer + 4 h s FLOPs per token, its backward twice that plus the forward again when
    checkpointed; the output layer's 2 V h and 4 V h."""
    from deepspeed.runtime.utils import partition_balanced

    L, h, s, V = cfg.num_layers, cfg.hidden_size, cfg.seq_length, cfg.vocab_size
    d = h // cfg.num_attention_heads
    n_layer = h * d * (2 * cfg.num_attention_heads + 2 * cfg.kv_heads) + 3 * h * cfg.intermediate_size
    lay = plan.layout
    items = ["embedding"] + ["layer"] * L + ["final_norm", "output"]
    bounds = partition_balanced([1 if i == "layer" else 0 for i in items], lay.pp)
    per_token = lay.micro * s / (lay.tp * plan.tflops * 1e12)
    fwd, bwd = [], []
    for stage in range(lay.pp):
        specs = items[bounds[stage]:bounds[stage + 1]]
        layer_fwd, output_fwd = specs.count("layer") * (2 * n_layer + 4 * h * s), specs.count("output") * 2 * V * h
        fwd.append((layer_fwd + output_fwd) * per_token)
        bwd.append((2 * layer_fwd + (layer_fwd if lay.checkpoint else 0) + 2 * output_fwd) * per_token)
    return fwd, bwd


@pytest.mark.parametrize("names,gpus,gpu,update,exact", [
    (["astrosage70b_cpt.yml"], 2048, "mi250x", {}, True),  # the paper's layout: stage 7 also runs the output layer
    (["llama3.1-8b.yml"], 4, "h100", {"pipe_parallel_size": 4, "gradient_accumulation_steps": 8}, True),
    # 126 layers over 16 stages: the first 14 get 8 layers, the last two 7 (and the output layer)
    (["llama3.1-405b.yml"], 128, "h100", {"model_parallel_size": 8, "pipe_parallel_size": 16,
                                          "gradient_accumulation_steps": 16, "checkpoint_activations": True}, False),
])
def test_step_time_is_deepspeeds_1f1b_schedule_over_unequal_stages(names, gpus, gpu, update, exact):
    cfg = load(*names).config.model_copy(update=update)
    plan = planning.make_plan(cfg, gpus=gpus, gpu=gpu)
    fwd, bwd = stage_seconds_by_hand(cfg, plan)
    assert plan.stage_seconds == pytest.approx([f + b for f, b in zip(fwd, bwd)])
    simulated = schedule_makespan(fwd, bwd, plan.layout.gas)
    if exact:  # the slowest stage is the last: the planner's formula is the schedule's
        assert plan.step_seconds == pytest.approx(simulated, rel=1e-9)
        balanced = plan.compute_seconds / (1 - plan.bubble)  # what equal stages would take
        assert simulated > 1.03 * balanced
    else:  # a slowest stage before the last overlaps a little more: the planner errs long, by little
        assert simulated <= plan.step_seconds <= simulated * 1.01


# ------------------------------------------------------------------------------------------ activations (CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_activations_are_what_autograd_saves(single_rank, dtype):
    """Every storage a TransformerLayer's forward hands autograd, summed once, against the planner's formula
    (unfused: CPU runs the plain pointwise functions). The shared RoPE cos/sin tables are the only extra."""
    from megatron.model.config import LlamaConfig
    from megatron.model.layers import TransformerLayer

    h, nq, nkv, f, seq, micro = 256, 8, 2, 768, 256, 2
    cfg = LlamaConfig(num_layers=2, hidden_size=h, num_attention_heads=nq, num_kv_heads=nkv, intermediate_size=f,
                      vocab_size=512, padded_vocab_size=512, max_position_embeddings=seq, params_dtype=dtype)
    layer = TransformerLayer(cfg, 0).train()
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(micro, seq, h, dtype=dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    act = 2 if dtype == torch.bfloat16 else 4
    shape = planning.Shape(layers=2, hidden=h, heads=nq, kv_heads=nkv, ffn=f, vocab=512, vocab_multiple=128, seq=seq)
    rope_tables = 2 * seq * (h // nq) * act
    predicted = planning.layer_activation_bytes(shape, 1, micro, act) + rope_tables
    assert abs(predicted - sum(saved.values())) <= 0.005 * sum(saved.values())


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors the ops under this mode create that are still alive, and their peak (storages are
    counted once and leave the count when they are freed)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = 0, 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self._seen:
                storage, n = t.untyped_storage(), t.untyped_storage().nbytes()
                self._seen.add(storage.data_ptr())
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, storage.data_ptr(), n)
        return out

    def _freed(self, ptr: int, n: int) -> None:
        self.live -= n
        self._seen.discard(ptr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_cross_entropy_backward_peak_is_what_the_planner_assumes(single_rank, dtype):
    """TP 1 without fused kernels: the loss's backward is the largest transient of a one-GPU run (17 bytes per
    logit in bf16 besides the logits); the planner's loss term must be that, not the 8 of megatron-core's path."""
    from megatron.model import kernels

    b, s, vocab = 2, 256, 4096
    logits = torch.randn(b, s, vocab, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(0))
    loss = kernels.cross_entropy(logits, labels, False).mean()
    with LiveBytes() as tracker:
        loss.backward()
    act = 2 if dtype == torch.bfloat16 else 4
    shape = planning.Shape(layers=1, hidden=8, heads=1, kv_heads=1, ffn=8, vocab=vocab, vocab_multiple=128, seq=s)
    beyond_logits = planning.loss_peak_bytes(shape, 1, b, act, fused=False) - act * logits.numel()
    assert tracker.peak == pytest.approx(beyond_logits, rel=1e-3)  # the rest: per-token vectors (lse, grad)


@pytest.mark.parametrize("matrices,vectors", [(600, 40), (400, 40), (400, 0), (0, 40)])
def test_gradient_allreduce_memory_is_what_deepspeeds_bucketing_allocates(matrices, vectors, monkeypatch):
    """DeepSpeed's own allreduce_no_retain (which _bf16_reduce_grads reaches) run on CPU over the BF16 optimizer's
    flat fp32 gradient buffers, one per parameter group, with a bucket of 500 elements standing in for its 500M
    and the communication dtype the trainer configures: the bytes it allocates are the planner's term."""
    import types

    from deepspeed.runtime import engine as ds_engine
    from deepspeed.runtime.config import get_communication_data_type
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    from megatron.config.deepspeed_config import deepspeed_config

    cfg = load("astrosage70b_cpt.yml").config
    comm = get_communication_data_type(deepspeed_config(cfg, 32, "bf16"))  # what the engine reads from it
    monkeypatch.setattr(ds_engine.dist, "all_reduce", lambda *a, **k: None)  # one rank: the sum is the tensor
    monkeypatch.setattr(planning.memory, "ALLREDUCE_BUCKET", 500)
    engine = types.SimpleNamespace(flatten=_flatten_dense_tensors, unflatten=_unflatten_dense_tensors,
                                   communication_data_type=comm, gradient_average=False)
    for name in ("allreduce_bucket", "allreduce_and_copy"):
        setattr(engine, name, getattr(ds_engine.DeepSpeedEngine, name).__get__(engine))
    buffers = [torch.ones(n) for n in (matrices, vectors) if n]  # param_groups drops an empty group
    with LiveBytes() as tracker:
        tracker._seen.update(b.untyped_storage().data_ptr() for b in buffers)  # they exist already
        ds_engine.DeepSpeedEngine.allreduce_no_retain(engine, buffers, dp_group=None, numel_per_bucket=500,
                                                      dp_world_size=1)
    assert tracker.peak == planning.allreduce_bytes(matrices, vectors, planning.precision_of(cfg))


# ------------------------------------------------------------------------------------------ measured peaks (GPU)
def test_predicted_peak_is_within_15_percent_of_every_gpu_measurement():
    records = json.loads(MEASUREMENTS.read_text())
    gpu = [r for r in records if "cpu" not in r["device"].lower()]
    assert len(gpu) >= 2, f"{MEASUREMENTS} needs GPU measurements (tools/plan.py CONFIG --measure --record)"
    for r in records:
        assert r.get("metric", "torch.cuda.max_memory_allocated") == "torch.cuda.max_memory_allocated"
        predicted = planning.predict_peak_gib(r["config"], r.get("world_size") or r["config"].get("num_gpus") or 1)
        error = predicted / r["measured_peak_gib"] - 1
        assert abs(error) <= 0.15, f"{r['source']} on {r['device']}: predicted {predicted:.2f} GiB, measured " \
                                   f"{r['measured_peak_gib']:.2f} GiB ({100 * error:+.1f}%)"


def test_predict_peak_gib_reports_the_worst_stage():
    cfg = load("astrosage70b_cpt.yml").config
    keys = cfg.model_dump(mode="json")
    allocated = planning.predict_peak_gib(keys, 2048)
    assert allocated == planning.make_plan(cfg, gpus=2048).peak_gib
    assert allocated == max(st.peak for st in planning.make_plan(cfg, gpus=2048).stages) / planning.GIB
    assert planning.predict_peak_gib(keys, 2048, what="device") == pytest.approx(
        allocated * (1 + planning.FRAGMENTATION) + planning.CONTEXT_GIB)


# ------------------------------------------------------------------------------------------ configs and CLI
def test_every_shipped_config_plans():
    for path in CONFIGS:
        names = [path.name]
        if "num_layers" not in path.read_text():  # run overlays (demo*.yml) go on top of the tiny model, as make demo
            names = ["tiny_cpu.yml", path.name]
        plan = planning.make_plan(load(*names).config)
        text = planning.format_plan(plan, path.name)
        assert plan.params > 0 and plan.peak_gib > 0 and math.isfinite(plan.step_seconds), path.name
        assert "Verdict:" in text, path.name


def test_cli_plans_the_astrosage_layout_and_it_fits(capsys):
    assert cli_main()(["configs/astrosage70b_cpt.yml", "--gpu", "mi250x", "--strict"]) == 0
    out = capsys.readouterr().out
    assert "2,048 x AMD MI250X GCD" in out
    assert "TP 8 x PP 8 x DP 32, micro-batch 1 x 16 accumulation" in out
    assert "70,553,706,496" in out
    assert "Verdict: FITS" in out
    assert "7/23 = 30.4%" in out


def test_the_paper_layout_in_the_docs_is_what_the_cli_prints(capsys):
    """docs/planning.md shows the paper's plan as an excerpt ("  ..." for the legend): every other line is the
    tool's, in order."""
    docs = (ROOT / "docs" / "planning.md").read_text()
    command = "$ python tools/plan.py configs/astrosage70b_cpt.yml --gpu mi250x --train-iters 512\n"
    shown = docs[docs.index(command) + len(command):].split("```", 1)[0].splitlines()
    assert cli_main()(command.split()[3:]) == 0
    printed = iter(capsys.readouterr().out.splitlines())
    for line in shown:
        if line != "  ...":
            assert line in printed, line  # consumes the output up to the line: order is checked too


def test_a_layout_that_does_not_fit_gets_a_suggestion_that_fits(capsys):
    main = cli_main()
    assert main(["configs/astrosage70b_cpt.yml", "--gpu", "mi250x", "--no-checkpoint", "--strict"]) == 1
    out = capsys.readouterr().out
    assert "Verdict: DOES NOT FIT" in out and "Nearest layouts that fit on the same 2,048 GPUs" in out

    cfg = load("astrosage70b_cpt.yml").config
    layout, _ = planning.alternative_layout(cfg, checkpoint=False)
    plan = planning.make_plan(cfg, gpu="mi250x", layout=layout)
    assert not plan.fits
    found, more_gpus = planning.suggest(cfg, plan)
    assert found and more_gpus is None
    best = found[0].layout
    again = planning.make_plan(cfg, gpu="mi250x", layout=best)  # re-planned from scratch, not trusted
    assert again.fits and not again.problems
    assert best.global_batch == 512 and best.gpus == 2048
    assert best.checkpoint  # the one-key change: turn checkpointing back on


def test_suggestions_for_a_selective_config_are_configs_the_validator_accepts():
    """Selective recompute needs checkpointing and no partitioning: a suggestion that turns partitioning on must
    also say `recompute_granularity: full`, or following it gives a config deepy.py refuses."""
    from megatron.config.validate import _parallel

    # Selective keeps the matmul outputs: at TP 8 two sequences per micro-batch overflow a 64 GB GCD.
    cfg = load("astrosage70b_cpt.yml").config.model_copy(update={
        "recompute_granularity": "selective", "partition_activations": False, "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 8})
    assert not _parallel(cfg, 2048)
    plan = planning.make_plan(cfg, gpu="mi250x")
    assert plan.layout.selective and not plan.fits
    found, _ = planning.suggest(cfg, plan)
    changes = cli_main().__globals__["_changes"]  # tools/plan.py: the "set:" line of each suggestion
    assert {p.layout.selective for p in found} == {True, False}  # both kinds of way out are offered here
    for p in found:
        keys = changes(p.layout, plan.layout)
        followed = cfg.model_copy(update=keys)
        assert not _parallel(followed, 2048), (p.layout.describe(), keys)
        assert planning.layout_of(followed, 2048) == p.layout


SUGGESTION_CASES = {
    # checkpointing every 5 layers and 2 sequences per micro-batch overflow a GCD; the fixes checkpoint every layer
    "checkpoint_num_layers": (["astrosage70b_cpt.yml"], None, "mi250x", {
        "checkpoint_num_layers": 5, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 8}),
    # one GPU cannot hold 405B: on 256, DP 2 divides the global batch of 16, which accumulation keeps
    "global batch kept": (["llama3.1-405b.yml"], None, "h100", {
        "train_batch_size": 16, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 16}),
    # unfused, nothing fits on 128 GPUs; on 256, DP 2 does not divide 15: those layouts change it, and say so
    "global batch changed": (["llama3.1-405b.yml"], 128, "h100", {
        "gradient_accumulation_fusion": False,
        "model_parallel_size": 8, "pipe_parallel_size": 16, "checkpoint_activations": True,
        "train_batch_size": 15, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 15}),
    # --gpus 128 at TP 1 x PP 1 cannot keep a batch of 16 (the evaluated layout takes 2048, with a note); the
    # suggestions, on 256 GPUs, return to the config's 16
    "evaluated layout changed the batch": (["llama3.1-405b.yml"], 128, "h100", {
        "train_batch_size": 16, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 16}),
}


@pytest.mark.parametrize("case", sorted(SUGGESTION_CASES))
def test_following_a_suggestion_gives_a_valid_config_that_fits_as_promised(case):
    """Each suggestion's `set:` keys (tools/plan.py), written into the config and run on the suggested GPU count:
    the trainer's validator accepts the result, and planning it from scratch gives the layout and the memory the
    suggestion promised. The plan and the search are made as the CLI makes them (`--gpus` when a count is given)."""
    from megatron.config.validate import _parallel

    names, gpus, gpu, update = SUGGESTION_CASES[case]
    cfg = load(*names).config.model_copy(update=update)
    layout, _ = planning.alternative_layout(cfg, gpus=gpus)
    plan = planning.make_plan(cfg, gpus=gpus, gpu=gpu, layout=layout)
    batch = planning.configured_global_batch(cfg)
    assert not plan.fits
    found, _ = planning.suggest(cfg, plan, limit=100, batch=batch)  # all that fit at the count found
    assert found
    changes = cli_main().__globals__["_changes"]  # tools/plan.py: the "set:" line of each suggestion
    for p in found:
        keys = changes(p.layout, plan.layout, batch)
        followed = cfg.model_copy(update=keys)
        assert not _parallel(followed, p.gpus), (p.layout.describe(), keys)
        again = planning.make_plan(followed, gpus=p.gpus, gpu=gpu)
        assert again.layout == p.layout, keys
        assert again.fits and again.peak_gib == p.peak_gib
    batches = {p.layout.global_batch for p in found}
    assert batches == ({16, 15} if case == "global batch changed" else {batch})
    if case == "global batch changed":  # the ones that keep it come first
        assert found[0].layout.global_batch == 15


def test_a_gpu_count_tp_x_pp_does_not_divide_is_planned_and_searched_as_asked(capsys):
    """--gpus 32 with TP 8 x PP 8: the plan says so and the search looks for layouts on 32 GPUs, not 64."""
    main = cli_main()
    assert main(["configs/astrosage70b_cpt.yml", "--gpu", "mi250x", "--gpus", "32", "--strict"]) == 1
    out = capsys.readouterr().out
    assert "32 x AMD MI250X GCD" in out
    assert "layout problem: 32 GPUs is not a multiple of TP x PP = 64" in out
    assert "Nearest layouts that fit on the same 32 GPUs" in out
    cfg = load("astrosage70b_cpt.yml").config
    for gpus, larger in ((32, None), (1, 32)):  # on 1 GPU nothing fits: 32 is the first count where one does
        layout, _ = planning.alternative_layout(cfg, gpus=gpus)
        plan = planning.make_plan(cfg, gpus=gpus, gpu="mi250x", layout=layout)
        assert plan.gpus == gpus and not plan.fits
        found, more_gpus = planning.suggest(cfg, plan)
        assert more_gpus == larger
        assert found and all(p.gpus == p.layout.gpus == (larger or gpus) for p in found)
        assert all(p.layout.global_batch == 512 for p in found)
    with pytest.raises(ValueError, match="gpus must be positive, not -8"):
        planning.alternative_layout(cfg, gpus=-8)


@pytest.mark.parametrize("flag,value", [("--gpus", "0"), ("--gpus", "-8"), ("--tp", "0"), ("--pp", "-2"),
                                        ("--micro-batch", "0"), ("--mfu", "0"), ("--mfu", "-1"), ("--mfu", "1.5"),
                                        ("--tflops", "0"), ("--train-iters", "-5"), ("--gpus", "two")])
def test_the_cli_refuses_counts_and_rates_that_are_not_positive(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main()(["configs/astrosage70b_cpt.yml", flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}: " in capsys.readouterr().err


def test_a_model_too_big_for_its_gpus_is_told_how_many_it_needs():
    cfg = load("llama3.1-70b.yml").config  # a preset alone: one GPU, which 70B cannot fit in any layout
    plan = planning.make_plan(cfg, gpu="h100")
    assert not plan.fits
    found, more_gpus = planning.suggest(cfg, plan)
    assert found and more_gpus and more_gpus > 1
    assert all(p.fits and p.layout.gpus == more_gpus for p in found)
    # and no smaller power-of-two count has a layout that fits
    smaller = planning.suggest(cfg, planning.make_plan(cfg, gpus=more_gpus // 2, gpu="h100"), max_scale=1)[0]
    assert smaller == []


def test_illegal_layouts_are_reported_with_the_configs_own_rules():
    cfg = load("astrosage70b_cpt.yml").config
    layout, _ = planning.alternative_layout(cfg, tp=3, gpus=3 * 8 * 32)
    plan = planning.make_plan(cfg, gpus=3 * 8 * 32, gpu="mi250x", layout=layout)
    assert not plan.fits
    assert any("num_attention_heads 64 is not divisible by model_parallel_size 3" in p for p in plan.problems)


def test_gradient_accumulation_fusion_drops_the_bf16_grads_of_matrices():
    """With the fusion the matrices (layers, embedding, output layer) have no bf16 param.grad (their gradients go
    straight into the fp32 buffer, megatron/grad_accum_fusion.py); the norms keep theirs."""
    shape = planning.Shape(layers=4, hidden=4096, heads=32, kv_heads=8, ffn=14336, vocab=128256,
                           vocab_multiple=128, seq=8192)
    layout = planning.Layout(tp=1, pp=1, dp=1, micro=1, gas=8, checkpoint=False)
    _, _, (plain,) = planning.plan_memory(shape, layout, planning.Precision("bf16", "fp32", 1))
    _, _, (fused,) = planning.plan_memory(shape, layout, planning.Precision("bf16", "fp32", 1, fused_grads=True))
    unfused_params = (2 * 4 + 1) * 4096  # 2 norms per layer + the final norm
    assert plain.grads - fused.grads == 2 * (plain.params - unfused_params)
    assert fused.peak < plain.peak
    # fp32 runs have no fp32 buffer to fuse into: nothing changes.
    _, _, (fp32,) = planning.plan_memory(shape, layout, planning.Precision("fp32", "fp32", 1))
    _, _, (fp32_flag,) = planning.plan_memory(shape, layout, planning.Precision("fp32", "fp32", 1, fused_grads=True))
    assert fp32.peak == fp32_flag.peak
    cfg = load("llama3.1-8b.yml").config  # bf16, the key unset: fused, as the trainer does
    assert cfg.gradient_accumulation_fusion is None and planning.precision_of(cfg).grads_fused
    assert not planning.precision_of(cfg.model_copy(update={"gradient_accumulation_fusion": False})).grads_fused
    fp32 = cfg.model_copy(update={"precision": "fp32"})
    assert not planning.precision_of(fp32).grads_fused


def test_selective_recompute_trades_memory_for_no_matmul_recompute():
    """recompute_granularity: selective (read from the config) keeps, per checkpointed layer, the matmul and
    attention outputs on top of full checkpointing's input (the exact count is checked against a CPU forward in
    tests/distributed/test_activation_memory.py), and replays no matmul, so no recompute factor."""
    cfg = load("llama3.1-8b.yml").config.model_copy(update={"checkpoint_activations": True, "train_iters": 10})
    selective = cfg.model_copy(update={"recompute_granularity": "selective"})
    full_plan, sel_plan = planning.make_plan(cfg, gpus=8), planning.make_plan(selective, gpus=8)
    assert not full_plan.layout.selective and sel_plan.layout.selective
    assert "selective" in sel_plan.layout.describe()
    assert full_plan.recompute_factor > 1.2 and sel_plan.recompute_factor == 1.0
    (full,), (sel,) = full_plan.stages, sel_plan.stages
    layout, shape = sel_plan.layout, sel_plan.shape
    kept = planning.selective_kept_bytes(shape, layout.tp, layout.micro, 2)
    assert sel.act_stored - full.act_stored == pytest.approx(full.in_flight * shape.layers * kept)
    assert sel.act_stored < sel.act_no_ckpt
    # Without checkpointing there is nothing to be selective about: the key changes nothing.
    off = planning.make_plan(selective.model_copy(update={"checkpoint_activations": False}), gpus=8)
    assert not off.layout.selective
    # Document masking runs compiled FlexAttention on the GPU, which the policy cannot see: attention is not kept
    # but recomputed, a third of its 12 L h s FLOPs per token again.
    flex_plan = planning.make_plan(selective.model_copy(update={"reset_attention_mask": True}), gpus=8)
    assert flex_plan.precision.attention == "flex"
    sh = flex_plan.shape
    attention_forward = 4 * sh.layers * sh.hidden * sh.seq
    assert flex_plan.recompute_factor == pytest.approx(1 + attention_forward / flex_plan.flops_per_token)
    (flex,) = flex_plan.stages
    attn_kept = planning.selective_kept_bytes(shape, layout.tp, layout.micro, 2) - planning.selective_kept_bytes(
        shape, layout.tp, layout.micro, 2, "flex")
    assert attn_kept > 0
    assert sel.act_stored - flex.act_stored == pytest.approx(flex.in_flight * shape.layers * attn_kept)
