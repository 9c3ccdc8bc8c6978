"""The config schema: merging, validation before launch, shipped configs, the generated key reference."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from megatron.config import ConfigError, build_config, load_config
from megatron.config.docs import render
from megatron.model.config import LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PRESETS = sorted(CONFIGS.glob("llama3.1-*.yml"))
RUN_STUB = {"train_iters": 10, "train_data_paths": ["data/x_text_document"]}


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def tiny_raw(**over):
    raw = yaml.safe_load((CONFIGS / "tiny_cpu.yml").read_text())
    raw.update(RUN_STUB)
    raw.update(over)
    return raw


def test_shipped_model_presets_validate_and_count_parameters_exactly():
    # Parameter counts of meta-llama/Llama-3.1-{8B,70B,405B} (HF safetensors index totals / model cards).
    expected = {"8b": 8_030_261_248, "70b": 70_553_706_496, "405b": 405_853_388_800}
    assert {p.stem.split("-")[1] for p in PRESETS} == set(expected)
    for path in PRESETS:
        raw = {**yaml.safe_load(path.read_text()), **RUN_STUB}
        cfg = build_config(raw)
        model = LlamaConfig.from_neox(cfg, cfg.vocab_size, params_dtype=None)
        assert model.count_parameters() == expected[path.stem.split("-")[1]], path.name


def test_astrosage_config_validates_against_the_gpus_it_names():
    loaded = load_config([str(CONFIGS / "astrosage70b_cpt.yml")])
    cfg = loaded.config
    world = cfg.world_size()
    assert world == 2048
    assert (cfg.tp, cfg.pp, cfg.dp(world)) == (8, 8, 32)
    assert cfg.zero_optimization.stage == 1 and cfg.checkpoint_activations
    assert cfg.resolved_precision == "bf16" and cfg.seq_length == 8192
    assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == 8.0


def test_demo_configs_validate_together():
    loaded = load_config([str(CONFIGS / "tiny_cpu.yml"), str(CONFIGS / "demo.yml")])
    assert loaded.config.pp == 2 and loaded.config.world_size() == 2
    assert any(line.startswith("num_gpus:") for line in loaded.overrides)


def test_later_file_overrides_earlier_and_nested_maps_merge(tmp_path):
    a = write(tmp_path, "a.yml", """
        optimizer: {type: Adam, params: {lr: 1.0e-3, betas: [0.9, 0.95]}}
        seq-length: 64
        """)
    b = write(tmp_path, "b.yml", """
        optimizer: {params: {lr: 5.0e-4}}
        seq_length: 128
        """)
    base = write(tmp_path, "base.yml", yaml.safe_dump(tiny_raw(seq_length=32)))
    loaded = load_config([base, a, b])
    cfg = loaded.config
    assert cfg.seq_length == 128 and cfg.lr == 5.0e-4 and cfg.optimizer.params.betas == (0.9, 0.95)
    assert any("seq_length: 64" in o and "b.yml" in o for o in loaded.overrides)
    assert loaded.sources["seq_length"] == b


MALFORMED = [
    # (overrides, key that must be named, words expected in the message)
    ({"num_layer": 4}, "num_layer", "num_layers"),  # typo → did-you-mean
    ({"memory_profiling": True}, "memory_profiling", "profile_memory_snapshot"),  # GPT-NeoX key, named here
    ({"use-mup": True}, "use_mup", "muP"),  # GPT-NeoX key (hyphenated) for a feature this trainer lacks
    ({"train_label_data_paths": ["a_l", "b_l"]},
     "train_label_data_paths", "2 label datasets for 1 train_data_paths"),
    ({"valid_label_data_paths": ["v_l"]}, "valid_label_data_paths", "data_path + split takes no labels"),
    ({"train_label_data_paths": ["a_l"], "train_iters": None, "train_epochs": 0.6, "pack_impl": "packed"},
     "train_label_data_paths,train_epochs", "epochs of whole conversations"),
    ({"hidden_size": "wide"}, "hidden_size", "integer"),  # wrong type
    ({"num_attention_heads": 6}, "hidden_size,num_attention_heads", "divisible"),  # 64 % 6
    ({"num_kv_heads": 3}, "num_kv_heads", "multiple"),  # 4 % 3
    ({"model_parallel_size": 3, "num_gpus": 3}, "model_parallel_size", "divisible"),  # heads % TP
    ({"pipe_parallel_size": 8, "num_gpus": 8}, "pipe_parallel_size", "layers"),  # PP > layers
    ({"model_parallel_size": 2, "num_gpus": 3}, "model_parallel_size,pipe_parallel_size", "world size"),
    ({"train_batch_size": 7}, "train_batch_size", "must equal"),
    ({"seq_length": 1024}, "seq_length", "max_position_embeddings"),
    ({"norm": "layernorm"}, "norm", "rmsnorm"),
    ({"min_lr": 1.0}, "min_lr", "peak lr"),
    ({"train_data_weights": [0.5, 0.5]}, "train_data_weights", "weights"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage", "1"),
    ({"precision": "bf16", "zero_optimization": {"stage": 0}}, "zero_optimization.stage", "{stage: 1}"),
    ({"precision": "fp32", "zero_optimization": {"stage": 0}}, "zero_optimization.stage", "no gradient norm"),
    ({"attention_dropout": 0.1, "model_parallel_size": 2, "num_gpus": 2}, "attention_dropout", "same masks"),
    ({"profile": True, "profile_step_start": 5, "profile_step_stop": 3}, "profile_step_stop", "before"),
    ({"rope_scaling": {"rope_type": "llama3", "original_max_position_embeddings": 4096}}, "rope_scaling", "exceeds"),
    ({"fp16": {"enabled": True}}, "fp16", "bf16"),
    ({"precision": "fp32", "gradient_accumulation_fusion": True}, "gradient_accumulation_fusion", "fp32 buffer"),
    ({"num_nodes": 4}, "num_nodes,hostfile", "hostfile"),
    ({"data_path": "data/y", "train_data_paths": ["data/x"]}, "data_path,train_data_paths", "not both"),
    ({"checkpoint_factor": 10}, "checkpoint_factor,save", "save"),
    ({"model_parallel_size": 4, "num_kv_heads": 2, "num_attention_heads": 4, "num_gpus": 4,
      "intermediate_size": 190}, "model_parallel_size", "intermediate_size"),
    # 3D-parallel layouts that cannot be built
    ({"hidden_size": 96, "num_attention_heads": 12, "num_kv_heads": 3, "model_parallel_size": 2, "num_gpus": 2},
     "model_parallel_size", "divide one another"),  # kv heads neither split nor replicated evenly
    ({"num_attention_heads": 16, "num_kv_heads": 1, "model_parallel_size": 8, "num_gpus": 8},
     "model_parallel_size", "head size 4 is not divisible by 8"),  # a shared kv head's rows do not split
    ({"pipe_parallel_size": 2, "model_parallel_size": 2, "num_gpus": 6}, "model_parallel_size,pipe_parallel_size",
     "world size 6"),  # world size not TP x PP x DP
    ({"pipe_parallel_size": 5, "num_gpus": 5}, "pipe_parallel_size", "only 4 layers"),
    ({"partition_activations": True}, "partition_activations", "checkpointed activations"),
    ({"recompute_granularity": "selective"}, "recompute_granularity", "checkpointed activations"),
    ({"recompute_granularity": "selective", "checkpoint_activations": True, "partition_activations": True},
     "recompute_granularity", "partition_activations"),
    ({"recompute_granularity": "some"}, "recompute_granularity", "selective"),
    ({"recompute_granularity": "selective", "checkpoint_activations": True, "hidden_dropout": 0.1},
     "recompute_granularity", "dropout"),
    # run length and per-epoch replay (docs/replay.md)
    ({"train_iters": None}, "train_iters", "required"),
    ({"train_epochs": 2.5}, "train_iters,train_epochs", "not both"),
    ({"train_iters": None, "train_epochs": 0}, "train_epochs", "greater than 0"),
    ({"train_iters": None, "train_epochs": 2.5, "train_data_paths": ["data/a", "data/b"],
      "train_data_weights": [0.7, 0.3]}, "train_data_weights", "once per epoch"),
    ({"replay": {"data_paths": ["data/fineweb"]}}, "replay,train_epochs", "train_epochs"),
    ({"train_iters": None, "train_epochs": 2.5, "train_data_paths": None, "data_path": "data/y",
      "replay": {"data_paths": ["data/fineweb"]}}, "data_path,replay", "train_data_paths"),
    ({"train_iters": None, "train_epochs": 2.5, "replay": {"data_paths": ["data/f1", "data/f2"],
      "data_weights": [1.0]}}, "replay.data_weights", "1 weights for 2 data paths"),
    ({"train_iters": None, "train_epochs": 2.5, "replay": {"data_paths": ["data/f"], "valid_data_paths": ["data/v"],
      "valid_data_weights": [-1.0]}}, "replay.valid_data_weights", "non-negative"),
    ({"train_iters": None, "train_epochs": 2.5, "replay": {"data_paths": []}}, "replay.data_paths", "at least 1"),
    ({"train_iters": None, "train_epochs": 2.5, "replay": {"data_paths": ["data/f"], "fraction": 1.0}},
     "replay.fraction", "less than 1"),
    ({"train_iters": None, "train_epochs": 2.5, "replay": {"data_paths": ["data/f"], "fresh": True}},
     "replay.fresh", "remove it"),
]


@pytest.mark.parametrize("over,key,words", MALFORMED, ids=[m[1] for m in MALFORMED])
def test_malformed_config_is_refused_naming_the_key(tmp_path, over, key, words):
    path = write(tmp_path, "bad.yml", yaml.safe_dump(tiny_raw(**over)))
    with pytest.raises(ConfigError) as exc:
        load_config([path])
    issues = [i for i in exc.value.issues if i.key == key]
    assert issues, f"{key!r} not named; got {exc.value.keys()}"
    text = issues[0].format()
    assert words in text, text
    assert issues[0].file == path and issues[0].fix


def test_all_problems_are_reported_at_once(tmp_path):
    path = write(tmp_path, "bad.yml", yaml.safe_dump(tiny_raw(num_layer=4, hidden_size="x", min_lr=1.0,
                                                               seq_length=4096)))
    with pytest.raises(ConfigError) as exc:
        load_config([path])
    assert {"num_layer", "hidden_size", "min_lr", "seq_length"} <= set(exc.value.keys())


def test_deepy_refuses_bad_config_before_launch_without_traceback(tmp_path):
    path = write(tmp_path, "bad.yml", yaml.safe_dump(tiny_raw(num_attention_heads=6)))
    proc = subprocess.run([sys.executable, str(ROOT / "deepy.py"), "train.py", path], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "num_attention_heads" in proc.stderr and "nothing was launched" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_deepy_dry_run_writes_resolved_config_and_command(tmp_path):
    good = write(tmp_path, "good.yml", yaml.safe_dump(tiny_raw(num_gpus=2, run_dir=str(tmp_path / "run"))))
    proc = subprocess.run([sys.executable, str(ROOT / "deepy.py"), "train.py", good, "--dry-run"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load((tmp_path / "run" / "config.yml").read_text())
    assert resolved["num_gpus"] == 2 and resolved["pipe_partition_method"] == "type:transformer"
    assert "--num_gpus 2" in proc.stdout and "--config" in proc.stdout
    # Run from another folder, `train.py` is this checkout's: the workers are given its full path.
    assert f" {ROOT / 'train.py'} --config" in proc.stdout, proc.stdout


def test_an_entry_script_started_by_hand_says_how_to_start_it():
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), "configs/tiny_cpu.yml"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "python deepy.py generate.py CONFIG.yml [MORE.yml ...]" in proc.stderr, proc.stderr


def test_deepy_refuses_an_entry_script_that_does_not_exist_before_touching_the_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yml").write_text("the previous run's resolved config\n")
    good = write(tmp_path, "good.yml", yaml.safe_dump(tiny_raw(num_gpus=2, run_dir=str(run))))
    proc = subprocess.run([sys.executable, str(ROOT / "deepy.py"), "trian.py", good], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "launch:" not in proc.stdout and "Traceback" not in proc.stderr
    assert "entry script 'trian.py' not found" in proc.stderr and "train.py, generate.py or eval.py" in proc.stderr
    assert (run / "config.yml").read_text() == "the previous run's resolved config\n"


def test_deepy_takes_gpt_neox_options_and_config_names_without_suffix(tmp_path):
    """GPT-NeoX's `deepy.py train.py -d DIR NAME --wandb_group G`: NAME.yml in DIR, the option overriding the key."""
    write(tmp_path, "good.yml", yaml.safe_dump(tiny_raw(num_gpus=2, run_dir=str(tmp_path / "run"),
                                                        wandb_group="from-file")))
    proc = subprocess.run([sys.executable, str(ROOT / "deepy.py"), "train.py", "-d", str(tmp_path), "good",
                           "--wandb_group", "from-cli", "--wandb_team", "astro", "--dry-run"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wandb_group: 'from-file'" in proc.stdout and "-> 'from-cli' (command line)" in proc.stdout
    resolved = yaml.safe_load((tmp_path / "run" / "config.yml").read_text())
    assert resolved["wandb_group"] == "from-cli" and resolved["wandb_team"] == "astro"
    # -H names the hostfile; one that does not exist is refused before launch, naming the command line.
    proc = subprocess.run([sys.executable, str(ROOT / "deepy.py"), "train.py", "-d", str(tmp_path), "good",
                           "-H", str(tmp_path / "no_hostfile")], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 2 and "launch:" not in proc.stdout
    assert f"command line: hostfile = '{tmp_path / 'no_hostfile'}': file not found" in proc.stderr, proc.stderr


def test_key_reference_is_up_to_date():
    committed = (CONFIGS / "README.md").read_text()
    assert committed == render(), "configs/README.md is stale: run `make docs-config`"


def test_replay_demo_config_validates_and_the_astrosage_config_uses_replay():
    loaded = load_config([str(CONFIGS / "tiny_cpu.yml"), str(CONFIGS / "demo_replay.yml")])
    cfg = loaded.config
    assert cfg.train_iters is None and cfg.train_epochs == 2.5 and cfg.replay.fraction == 0.2
    assert cfg.train_data_paths and cfg.replay.valid_data_paths and cfg.valid_data_paths
    astro = load_config([str(CONFIGS / "astrosage70b_cpt.yml")]).config
    assert astro.train_epochs == 2.5 and astro.train_iters is None
    assert astro.replay.fresh_each_epoch and "fineweb" in astro.replay.data_paths[0]
    assert astro.replay.valid_data_paths and astro.train_data_weights is None


def test_epochs_without_replay_and_replay_with_several_pools_validate():
    build_config(tiny_raw(train_iters=None, train_epochs=1.5, train_data_paths=None, data_path="data/y"))
    cfg = build_config(tiny_raw(train_iters=None, train_epochs=2.5, replay={
        "data_paths": ["data/f1", "data/f2"], "data_weights": [0.5, 0.5], "fraction": 0.05,
        "fresh_each_epoch": False, "valid_data_paths": ["data/v"]}))
    assert cfg.replay.data_weights == [0.5, 0.5] and not cfg.replay.fresh_each_epoch


def test_workers_check_the_batch_rules_against_the_ranks_that_started(tmp_path):
    """num_gpus unset: deepy.py counts the GPUs it sees, and the resolved config cannot say how many that was."""
    from megatron.config.loader import load_resolved, save_resolved

    raw = tiny_raw(num_gpus=None, model_parallel_size=2, pipe_parallel_size=1, train_batch_size=8,
                   train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=2)
    path = save_resolved(build_config(raw, available_devices=8), tmp_path / "config.yml")
    assert load_resolved(path, world_size=8).dp(8) == 4
    with pytest.raises(ConfigError, match=r"train_batch_size.*1 x 2 x 2 = 4") as err:
        load_resolved(path, world_size=4)  # a launch that started fewer ranks than deepy.py counted
    assert err.value.format().splitlines()[0] == "Config error (1); nothing was launched:"
    # train.py says what happened instead: the launch did happen, and the ranks stop.
    head = err.value.format("the 4 ranks launched stop").splitlines()[0]
    assert head == "Config error (1); the 4 ranks launched stop:"


def test_world_size_is_counted_as_deepspeeds_runner_counts_it(tmp_path):
    from megatron.config.validate import launch_world_size

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# four nodes\n" + "".join(f"node{i} slots=8\n" for i in range(4)))

    def raw(**keys):
        return tiny_raw(**{"hostfile": str(hostfile), "num_gpus": None, **keys})

    def world(**keys):
        return launch_world_size(build_config(raw(**keys)))

    assert world() == 32  # every slot of every host
    assert world(num_gpus=8) == 32  # num_nodes -1: all hosts (GPT-NeoX's usual multi-node config)
    assert world(num_nodes=2) == 16  # the first two hosts, all their slots
    assert world(num_nodes=2, num_gpus=4) == 8
    assert world(include="node1@node3") == 16 and world(exclude="node0:0,1") == 30
    # The batch rule holds for the ranks DeepSpeed will start: 1 x 2 x DP 16 on two of the four hosts.
    build_config(raw(num_nodes=2, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=2,
                     train_batch_size=32))
    with pytest.raises(ConfigError, match="= 64"):
        build_config(raw(num_gpus=8, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=2,
                         train_batch_size=16))
    # What the launcher would refuse is refused before it runs, naming the keys.
    for keys, named in (({"include": "node1", "num_gpus": 8}, "include,exclude"),
                        ({"include": "node9"}, "include,exclude,hostfile")):
        with pytest.raises(ConfigError) as err:
            build_config(raw(**keys))
        assert named in err.value.keys()
    hostfile.write_text("node0 8\n")
    with pytest.raises(ConfigError, match="bad entry") as err:
        build_config(raw())
    assert err.value.keys() == ["hostfile"]


def test_deepy_imports_torch_only_where_a_gpu_driver_exists(tmp_path):
    """Counting GPUs imports torch (~1 s per launch and per refused config); without a driver's files there is
    nothing to count. In a fresh process: no torch after the count without a driver, torch's count with one."""
    code = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import deepy
assert "torch" not in sys.modules
deepy.GPU_DRIVER_PATHS = ({str(tmp_path / "no_driver")!r},)
assert deepy.cuda_device_count() == 0 and "torch" not in sys.modules
deepy.GPU_DRIVER_PATHS = ({str(tmp_path)!r},)  # a path that exists stands for a driver
n = deepy.cuda_device_count()
import torch
assert n == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
