"""FP8 training through torchao (megatron/model/fp8.py), on CPU with torchao's emulation.

References are torchao's own: its `Float8Linear` (the nn.Linear swap, `convert_to_float8_training`) with the same
`Float8LinearConfig`. In-process: one megatron-core layer against one Float8Linear. Through deepy.py: one training
step at TP 2 x PP 2 against a single-process Hugging Face model whose linear layers are torchao Float8Linear, on
the gathered weights the run started from; then resume.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from megatron.config import ConfigError, build_config
from megatron.model import fp8

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_train_e2e import VOCAB, synthetic_corpus  # noqa: E402

pytestmark = pytest.mark.skipif(not fp8.available(), reason=f"torchao missing: {fp8.INSTALL_HINT}")


def _tiny_raw(**over):
    raw = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yml").read_text())
    raw.update({"train_iters": 10, "train_data_paths": ["data/x_text_document"], "hidden_size": 64,
                "intermediate_size": 128, "seq_length": 32, "fp8": {"emulate": True}})
    raw.update(over)
    return raw


# ------------------------------------------------------------------------------------------------ the fp8 keys
def test_fp8_keys_are_validated():
    cfg = build_config(_tiny_raw())
    assert cfg.fp8.recipe == "tensorwise" and cfg.fp8.emulate
    assert build_config(_tiny_raw(fp8=None)).fp8 is None  # off by default
    with pytest.raises(ConfigError) as e:
        build_config(_tiny_raw(fp8={"recipe": "delayed", "emulate": True}))
    assert "fp8" in str(e.value) and "tensorwise" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_config(_tiny_raw(fp8={"emulate": True, "amax_history": 16}))
    assert "amax_history" in str(e.value)
    # torch._scaled_mm needs every per-rank GEMM size divisible by 16: intermediate 200 / TP 2 = 100 is not.
    with pytest.raises(ConfigError) as e:
        build_config(_tiny_raw(intermediate_size=200, model_parallel_size=2, num_gpus=2))
    assert e.value.keys() == ["fp8,model_parallel_size"] and "intermediate_size per TP rank = 100" in str(e.value)
    with pytest.raises(ConfigError) as e:  # micro batch 1 x seq 40 tokens: the weight-gradient GEMM's K
        build_config(_tiny_raw(seq_length=40, train_micro_batch_size_per_gpu=1))
    assert "tokens per micro-batch (micro batch x seq_length) = 40" in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without an FP8 GPU")
def test_fp8_without_emulation_is_refused_by_the_ranks_on_cpu(tmp_path):
    """deepy.py (and the planner) may run elsewhere than the GPUs, so the ranks check their device: deepy.py
    accepts the config and writes the resolved one (--dry-run here, to spare CI a launcher), and the worker entry
    point started on it as the launcher starts a rank refuses it: exit 2, the key and the fix, no traceback."""
    path = tmp_path / "fp8.yml"
    run = tmp_path / "run"
    path.write_text(yaml.safe_dump(_tiny_raw(fp8={"recipe": "rowwise"}, data_path=str(tmp_path / "none"),
                                             train_data_paths=None, run_dir=str(run), use_wandb=False)))
    proc = subprocess.run([sys.executable, str(ROOT / "deepy.py"), "--dry-run", "train.py", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29555", "PYTHONPATH": str(ROOT)}
    worker = [sys.executable, str(ROOT / "train.py"), "--local_rank=0", "--config", str(run / "config.yml"),
              "--run-dir", str(run)]
    proc = subprocess.run(worker, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "fp8.emulate = False: no CUDA GPU: FP8 matmuls need an NVIDIA Hopper or Ada GPU" in out
    assert "fix: run on a Hopper/Ada GPU, set fp8.emulate: true" in out
    assert "Traceback" not in out and not (run / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------- one layer against torchao
def _layers(recipe, fused=False):
    from megatron.core import tensor_parallel
    from megatron.core.model_parallel_config import ModelParallelConfig

    mp = ModelParallelConfig(tensor_model_parallel_size=1, params_dtype=torch.float32, use_cpu_initialization=True,
                             gradient_accumulation_fusion=fused)
    col = tensor_parallel.ColumnParallelLinear(64, 96, config=mp, init_method=torch.nn.init.normal_, bias=False,
                                               gather_output=False)
    row = tensor_parallel.RowParallelLinear(96, 64, config=mp, init_method=torch.nn.init.normal_, bias=False,
                                            input_is_parallel=True, skip_bias_add=False)
    holder = torch.nn.ModuleDict({"col": col, "row": row})
    assert sorted(fp8.convert_layer(holder, recipe, emulate=True)) == ["col", "row"]
    return col, row


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_parallel_layers_compute_what_torchao_float8linear_computes(single_rank, recipe):
    """A converted column- and row-parallel layer give torchao's Float8Linear's output and gradients exactly, and
    differ from the fp32 layer by FP8 rounding (so the FP8 path is really taken)."""
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear

    torch.manual_seed(0)
    col, row = _layers(recipe)
    config = Float8LinearConfig.from_recipe_name(recipe)
    config = type(config)(**{**config.__dict__, "emulate": True})
    for layer, (n_in, n_out) in ((col, (64, 96)), (row, (96, 64))):
        ref = Float8Linear.from_float(torch.nn.Linear(n_in, n_out, bias=False), config=config)
        ref.weight = torch.nn.Parameter(layer.weight.detach().clone())
        hp = torch.nn.Linear(n_in, n_out, bias=False)
        hp.weight = torch.nn.Parameter(layer.weight.detach().clone())
        x = torch.randn(2, 16, n_in)
        g = torch.randn(2, 16, n_out)
        outs = []
        for module in (layer, ref, hp):
            xi = x.clone().requires_grad_(True)
            y = module(xi)
            y = y[0] if isinstance(y, tuple) else y
            y.backward(g)
            outs.append((y.detach(), xi.grad, module.weight.grad))
            module.weight.grad = None
        for ours, theirs in zip(outs[0], outs[1]):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        for ours, exact in zip(outs[0], outs[2]):
            err = (ours - exact).abs().max() / exact.abs().max()
            assert 1e-3 < err < 0.1, err  # FP8 rounding: e4m3 keeps 3 mantissa bits, e5m2 (gradients) 2


def test_fused_gradient_accumulation_goes_into_main_grad(single_rank):
    """With gradient_accumulation_fusion the FP8 weight gradient is added into the fp32 main_grad over
    micro-batches and `.grad` stays empty, as in megatron-core's fused path."""
    from megatron import grad_accum_fusion

    grad_accum_fusion.install()
    torch.manual_seed(0)
    col, _ = _layers("tensorwise", fused=True)
    plain, _ = _layers("tensorwise")
    plain.weight.data.copy_(col.weight.data)
    col.weight.main_grad = torch.full_like(col.weight, 0.25)
    total = torch.zeros_like(col.weight)
    for _ in range(2):
        x, g = torch.randn(2, 16, 64), torch.randn(2, 16, 96)
        col(x)[0].backward(g)
        plain(x)[0].backward(g)
        total += plain.weight.grad
        plain.weight.grad = None
    assert col.weight.grad is None
    torch.testing.assert_close(col.weight.main_grad, 0.25 + total, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------- one training step at TP 2 x PP 2 through deepy.py
STEPS, MICRO, ACCUM = 3, 2, 2
MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_kv_heads": 2, "intermediate_size": 128,
         "seq_length": 32, "vocab_size": VOCAB, "make_vocab_size_divisible_by": 64}


def _launch(tmp: Path, name: str, data_prefix: str, **extra) -> Path:
    base = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yml").read_text())
    out = tmp / name
    cfg = {**base, **MODEL, "model_parallel_size": 2, "pipe_parallel_size": 2, "num_gpus": 4,
           "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM, "train_iters": STEPS,
           "log_interval": 1, "eval_iters": 0, "eval_interval": 1000, "data_path": data_prefix, "split": "100,0,0",
           "optimizer": {"type": "Adam", "params": {"lr": 1.0e-3, "eps": 1.0e-6}}, "warmup": 0.0, "min_lr": 1.0e-4,
           "weight_decay": 0.01, "gradient_clipping": 1.0e6, "checkpoint_factor": 1, "save": str(out / "ckpt"),
           "run_dir": str(out / "run"), "use_wandb": False, "tensorboard_dir": None,
           "master_port": 29000 + os.getpid() % 400 + len(name), "fp8": {"recipe": "tensorwise", "emulate": True},
           "checkpoint_activations": True, "partition_activations": True, **extra}
    path = tmp / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 4 ranks on 2 cores
    proc = subprocess.run([sys.executable, str(ROOT / "deepy.py"), "train.py", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{name} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return out


def _metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "train/loss" in r}


def _weights(out: Path, step: int, cfg) -> dict[str, torch.Tensor]:
    from megatron.checkpoint.hf_keys import pipe_to_hf_state

    shards: list[dict] = [{}, {}]
    for idx in range(cfg.num_layers + 3):
        for rank in range(2):
            name = f"layer_{idx:02d}-model_{rank:02d}-model_states.pt"
            state = torch.load(out / "ckpt" / f"global_step{step}" / name, map_location="cpu")
            shards[rank].update({f"{idx}.{k}": v for k, v in state.items()})
    return pipe_to_hf_state(shards, cfg, range(cfg.num_layers + 3))


@pytest.fixture(scope="module")
def fp8_runs(tmp_path_factory):
    """One fp8 run of STEPS steps at TP 2 x PP 2 (ZeRO-1; full activation checkpointing through DeepSpeed's, with
    the checkpointed inputs partitioned over TP), saving every step, and the same run resumed from its step-1
    checkpoint: 2 launches of 4 ranks, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("fp8")
    prefix = str(tmp / "synthetic_text_document")
    synthetic_corpus(prefix)
    straight = _launch(tmp, "straight", prefix)
    resumed = _launch(tmp, "resumed", prefix, load=str(straight / "ckpt"), load_iteration=1)
    return prefix, straight, resumed


def _reference_model(hf_llama_state: dict, model_cfg, recipe: str):
    """Single-process torchao reference: Hugging Face's Phi-3 modeling (Llama's maths with fused qkv and gate/up
    linears, the layout of our column-parallel weights), Llama-3.1's RoPE, every decoder linear swapped for
    torchao's Float8Linear by torchao's own `convert_to_float8_training`; lm_head stays high precision."""
    import transformers
    from torchao.float8 import convert_to_float8_training
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    common = dict(vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.hidden_size,
                  intermediate_size=model_cfg.intermediate_size, num_hidden_layers=model_cfg.num_layers,
                  num_attention_heads=model_cfg.num_attention_heads, num_key_value_heads=model_cfg.num_kv_heads,
                  max_position_embeddings=model_cfg.max_position_embeddings, rope_theta=model_cfg.rope_theta,
                  rms_norm_eps=model_cfg.rms_norm_epsilon, tie_word_embeddings=False)
    llama_cfg = transformers.LlamaConfig(**common, rope_scaling=dict(model_cfg.rope_scaling))
    model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**common, hidden_act="silu", pad_token_id=None,
                                                                 bos_token_id=1, eos_token_id=2))
    model.model.rotary_emb = LlamaRotaryEmbedding(config=llama_cfg)  # Phi-3's config refuses llama3 scaling
    state = {}
    for k, v in hf_llama_state.items():
        if ".q_proj." in k:
            state[k.replace("q_proj", "qkv_proj")] = torch.cat(
                [v, hf_llama_state[k.replace("q_proj", "k_proj")], hf_llama_state[k.replace("q_proj", "v_proj")]])
        elif ".gate_proj." in k:
            state[k.replace("gate_proj", "gate_up_proj")] = torch.cat([v, hf_llama_state[k.replace("gate", "up")]])
        elif not any(p in k for p in (".k_proj.", ".v_proj.", ".up_proj.")):
            state[k] = v
    model.load_state_dict({k: v.float().clone() for k, v in state.items()}, strict=True)
    config = fp8.float8_config(recipe, True)
    convert_to_float8_training(model, config=config, module_filter_fn=lambda mod, fqn: fqn != "lm_head")
    return model


@pytest.mark.distributed
def test_tp2_pp2_step_matches_torchao_float8linear_on_the_gathered_weights(fp8_runs, single_rank):
    """Step 1 (loss, gradient norm, updated weights) and step 2's loss of the TP 2 x PP 2 run equal those of the
    single-process torchao Float8Linear model started from the same weights, on the same batches, to 1e-5."""
    from torchao.float8.float8_linear import Float8Linear

    from megatron.config import load_config
    from megatron.checkpoint.hf_keys import pipe_to_hf_state
    from megatron.data.data_utils import build_train_valid_test_datasets, make_data_loader
    from megatron.model.config import LlamaConfig
    from megatron.model.llama import build_model
    from megatron.optim import lr_at, param_groups
    from megatron.trainer import _lm_batches

    prefix, straight, _ = fp8_runs
    cfg = load_config([str(straight.parent / "straight.yml")], available_devices=None).config
    model_cfg = LlamaConfig.from_neox(cfg, VOCAB, torch.float32)
    # The weights the run started from: the model's init is seeded per layer and layout-independent, so a
    # one-rank build without fp8 gives them.
    init = build_model(LlamaConfig(**{**model_cfg.__dict__, "fp8_recipe": None}), single_rank)
    start = pipe_to_hf_state([init.state_dict()], model_cfg, range(model_cfg.num_layers + 3))
    ref = _reference_model(start, model_cfg, "tensorwise")
    converted = sorted(n for n, m in ref.named_modules() if isinstance(m, Float8Linear))
    assert len(converted) == 4 * model_cfg.num_layers and "lm_head" not in converted

    # The batches of steps 1 and 2, as the trainer draws them (DP 1).
    train, _, _ = build_train_valid_test_datasets(
        data_path=prefix, split="100,0,0", seq_length=cfg.seq_length, seed=cfg.seed,
        train_num_samples=STEPS * MICRO * ACCUM, valid_num_samples=MICRO * ACCUM, test_num_samples=0,
        train_data_paths=None, train_data_weights=None, valid_data_paths=None, valid_data_weights=None,
        test_data_paths=None, test_data_weights=None, train_label_data_paths=None, valid_label_data_paths=None,
        test_label_data_paths=None, cache_dir=cfg.data_cache_dir)
    batches = _lm_batches(make_data_loader(train, MICRO, 0, 1, 0, 0))

    def step_loss(backward: bool) -> float:
        total = 0.0
        for _ in range(ACCUM):
            inputs, labels = next(batches)
            logits = ref(inputs).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
            if backward:
                (loss / ACCUM).backward()
            total += loss.item() / ACCUM
        return total

    optimizer = torch.optim.AdamW(param_groups(ref, cfg.weight_decay), lr=lr_at(0, cfg),
                                  betas=cfg.optimizer.params.betas, eps=cfg.optimizer.params.eps)
    loss1 = step_loss(backward=True)
    grad_norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in ref.parameters())).item()
    optimizer.step()
    with torch.no_grad():
        loss2 = step_loss(backward=False)

    logged = _metrics(straight)
    assert logged[1]["train/loss"] == pytest.approx(loss1, abs=1e-5)
    assert logged[1]["train/grad_norm"] == pytest.approx(grad_norm, rel=1e-5)
    assert logged[2]["train/loss"] == pytest.approx(loss2, abs=1e-5)
    after = _weights(straight, 1, model_cfg)
    ours = {n: p.detach() for n, p in ref.named_parameters()}
    for name, ref_w in ours.items():
        if ".qkv_proj." in name:
            w = torch.cat([after[name.replace("qkv_proj", p)] for p in ("q_proj", "k_proj", "v_proj")])
        elif ".gate_up_proj." in name:
            w = torch.cat([after[name.replace("gate_up_proj", p)] for p in ("gate_proj", "up_proj")])
        else:
            w = after[name]
        torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-5, msg=name)
    # ... and not the fp32 run's: with FP8 off the same step's loss differs by more than the tolerance.
    hp = _reference_model(start, model_cfg, "tensorwise")
    for module in hp.modules():  # undo the swap: the plain fp32 matmul on the same weights
        if isinstance(module, Float8Linear):
            module.forward = lambda x, m=module: torch.nn.functional.linear(x, m.weight, m.bias)
    batches = _lm_batches(make_data_loader(train, MICRO, 0, 1, 0, 0))
    ref = hp
    with torch.no_grad():
        assert abs(step_loss(backward=False) - loss1) > 1e-4


@pytest.mark.distributed
def test_fp8_resume_is_exact(fp8_runs, single_rank):
    _, straight, resumed = fp8_runs
    a, b = _metrics(straight), _metrics(resumed)
    assert sorted(b) == [2, 3]
    for step in (2, 3):
        assert b[step]["train/loss"] == a[step]["train/loss"]
        assert b[step]["train/grad_norm"] == a[step]["train/grad_norm"]
    cfg = LlamaConfigForTests()
    wa, wb = _weights(straight, STEPS, cfg), _weights(resumed, STEPS, cfg)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def LlamaConfigForTests():
    from megatron.model.config import LlamaConfig

    return LlamaConfig(num_layers=MODEL["num_layers"], hidden_size=64, num_attention_heads=4, num_kv_heads=2,
                       intermediate_size=128, vocab_size=VOCAB, padded_vocab_size=VOCAB)


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_fp8_layer_under_activation_checkpointing_matches_no_checkpointing(single_rank, granularity):
    """A transformer layer in FP8 checkpointed (full, or selective: the FP8 GEMMs' outputs kept, the casts and
    pointwise ops replayed) gives the un-checkpointed FP8 layer's output and gradients exactly."""
    from megatron.model import recompute
    from megatron.model.config import LlamaConfig
    from megatron.model.layers import TransformerLayer

    cfg = LlamaConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_kv_heads=2, intermediate_size=128,
                      vocab_size=256, padded_vocab_size=256, fp8_recipe="tensorwise", fp8_emulate=True)
    layer = TransformerLayer(cfg, 0)
    assert all(fp8.is_converted(layer.get_submodule(n)) for n in fp8.CONVERTED)
    x = torch.randn(2, 32, 64)
    g = torch.randn(2, 32, 64)
    results = []
    checkpoint = recompute.checkpoint_selective if granularity == "selective" else recompute.checkpoint_full
    for run in (lambda xi: layer(xi), lambda xi: checkpoint(layer, xi)):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = run(xi)
        y.backward(g)
        results.append([y.detach(), xi.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_only_the_transformer_layers_linears_are_converted(single_rank):
    """In a built model (one rank) the four linear layers of every transformer layer run FP8; the embedding, the
    output layer (logits) and the norms keep the high-precision path (megatron-core's own _forward_impl)."""
    from megatron.core import tensor_parallel

    from megatron.model.config import LlamaConfig
    from megatron.model.llama import build_model

    cfg = LlamaConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2, intermediate_size=128,
                      vocab_size=256, padded_vocab_size=256, fp8_recipe="rowwise", fp8_emulate=True)
    model = build_model(cfg, single_rank)
    converted = sorted(n for n, m in model.named_modules() if fp8.is_converted(m))
    assert converted == sorted(f"{i}.{n}" for i in (1, 2) for n in fp8.CONVERTED)
    linears = [n for n, m in model.named_modules()
               if isinstance(m, (tensor_parallel.ColumnParallelLinear, tensor_parallel.RowParallelLinear))]
    high_precision = sorted(set(linears) - set(converted))
    assert high_precision == ["4.linear"]  # the output layer
    assert "_forward_impl" not in vars(model.get_submodule("4.linear"))
    assert not fp8.is_converted(model.get_submodule("0.word_embeddings"))
    # Same parameters and state-dict keys as a bf16/fp32 model: checkpoints load either way.
    plain = build_model(LlamaConfig(**{**cfg.__dict__, "fp8_recipe": None}), single_rank)
    assert model.state_dict().keys() == plain.state_dict().keys()
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        if a is not None:
            assert torch.equal(a, b), name
    plain.load_state_dict(model.state_dict())
    model.load_state_dict(plain.state_dict())


@pytest.mark.distributed
def test_fp8_checkpoint_exports_bf16_weights_to_hugging_face(fp8_runs, tmp_path):
    """FP8 leaves no trace in a checkpoint (dynamic scaling keeps no state): the exporter writes the trained
    weights in bf16, and Hugging Face's LlamaForCausalLM loads them."""
    import importlib.util

    import transformers

    _, straight, _ = fp8_runs
    spec = importlib.util.spec_from_file_location("cli", ROOT / "tools" / "ckpts" / "convert_neox_to_hf.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "hf"
    argv = ["convert_neox_to_hf.py", "--input-dir", str(straight / "ckpt"), "--output-dir", str(out),
            "--dtype", "bf16"]
    old, sys.argv = sys.argv, argv
    try:
        cli.main()
    finally:
        sys.argv = old
    model = transformers.LlamaForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.bfloat16
    trained = _weights(straight, STEPS, LlamaConfigForTests())
    state = model.state_dict()
    for name, w in trained.items():
        assert torch.equal(state[name], w.to(torch.bfloat16)), name


def test_planner_prices_fp8_as_a_labelled_prediction():
    """megatron/planning/plan.py: FP8 shortens only the transformer layers' GEMM time (tensorwise more than rowwise),
    adds its one-byte working copies to the memory, and says both are predictions."""
    from megatron import planning

    raw = yaml.safe_load((ROOT / "configs" / "llama3.1-8b.yml").read_text())
    raw.update({"train_iters": 10, "data_path": "x", "precision": "bf16", "num_gpus": 8, "model_parallel_size": 2,
                "seq_length": 8192, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 8})
    plans = {}
    for recipe in (None, "tensorwise", "rowwise"):
        cfg = planning.config_from_keys({**raw, "fp8": {"recipe": recipe} if recipe else None})
        plans[recipe] = planning.make_plan(cfg, 8)
    bf16, tw, rw = plans[None], plans["tensorwise"], plans["rowwise"]
    assert bf16.fp8_time_factor == 1.0 and not any("fp8" in n for n in bf16.notes)
    assert 0.5 < tw.fp8_time_factor < rw.fp8_time_factor < 1.0
    assert tw.step_seconds == pytest.approx(bf16.step_seconds * tw.fp8_time_factor)
    shape = bf16.shape
    layer_share = 6 * shape.layers * (shape.attn_params() + shape.mlp_params()) / planning.flops_per_token(shape)
    assert tw.fp8_time_factor == pytest.approx(1 - planning.FP8_MATMUL_SHARE * layer_share * (1 - 1 / 1.6))
    assert tw.peak_gib >= bf16.peak_gib and tw.params == bf16.params
    assert any("PREDICTIONS" in n and "fp8 tensorwise" in n for n in tw.notes)
