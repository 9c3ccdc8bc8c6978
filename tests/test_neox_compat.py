"""GPT-NeoX configs: upstream-shaped files load and build upstream's model; GPT-NeoX-style mistakes are refused before
launch naming the key; launcher commands are DeepSpeed's own; workers read ranks from every launcher's variables."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron.config import ConfigError, build_config, load_config
from megatron.config.loader import close_spellings
from megatron.config.neox_compat import TABLE, neox_swiglu_width, render_table
from megatron.config.schema import NeoXConfig, all_keys
from megatron.model.config import LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
NEOX = Path(__file__).resolve().parent / "neox_configs"
LLAMA_7B = 6_738_415_616  # LLaMA-7B with its 32,000-token vocabulary (the model card's 6.7B)
LLAMA3_8B = 8_030_261_248  # meta-llama/Meta-Llama-3-8B(-Instruct), 128,256 tokens


def params(cfg: NeoXConfig, vocab: int) -> int:
    return LlamaConfig.from_neox(cfg, vocab, params_dtype=None).count_parameters()


@pytest.mark.parametrize("model", ["llama_7B.yml", "llama2_7B.yml", "llama_7B_mlp_type.yml"])
def test_upstream_llama_7b_configs_load_unchanged_and_build_llama_7b(model, tmp_path):
    loaded = load_config([str(NEOX / model), str(NEOX / "llama_setup.yml"), str(write(tmp_path, "run.yml", {
        "train_iters": 10, "vocab_size": 32000}))], available_devices=8)
    cfg = loaded.config
    assert cfg.intermediate_size == 11008 and cfg.activation == "swiglu"
    assert params(cfg, 32000) == LLAMA_7B
    assert cfg.run_dir == "logs"  # log_dir, mapped
    notes = "\n".join(loaded.notes)
    for key in ("gpt_j_residual", "output_layer_parallelism", "scaled_upper_triang_masked_softmax_fusion",
                "bias_gelu_fusion", "checkpoint_validation_with_forward_pass", "wandb_host", "log_dir"):
        assert f"{key}:" in notes, (key, notes)


def test_deepy_dry_run_of_the_upstream_7b_prints_info_lines_and_the_command(tmp_path):
    run = write(tmp_path, "run.yml", {"train_iters": 10, "vocab_size": 32000, "run_dir": str(tmp_path / "run")})
    proc = subprocess.run([sys.executable, str(ROOT / "deepy.py"), "train.py", str(NEOX / "llama_7B.yml"),
                           str(NEOX / "llama_setup.yml"), str(run), "--dry-run"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "info  GPT-NeoX intermediate_size: 32768 with mlp_multiple_of: 256" in proc.stdout
    assert "info  GPT-NeoX gpt_j_residual: False is a no-op here" in proc.stdout
    assert "launch: " in proc.stdout and "deepspeed.launcher.runner" in proc.stdout
    assert yaml.safe_load((tmp_path / "run" / "config.yml").read_text())["intermediate_size"] == 11008


def test_a_gpt_neox_config_relying_on_gpt_neox_model_defaults_is_refused(tmp_path):
    raw = yaml.safe_load((NEOX / "llama_7B.yml").read_text())
    for key in ("norm", "pos_emb", "no_weight_tying", "rms_norm_epsilon"):
        del raw[key]
    with pytest.raises(ConfigError) as err:
        load_config([str(write(tmp_path, "7b.yml", {**raw, "train_iters": 10, "data_path": "d"}))])
    assert set(err.value.keys()) == {"norm", "pos_emb", "no_weight_tying", "rms_norm_epsilon"}
    assert "layernorm" in err.value.format() and "1.0e-8" in err.value.format()


def test_llama_7b_without_mlp_multiple_of_is_refused_not_built_at_16b(tmp_path):
    raw = yaml.safe_load((NEOX / "llama_7B.yml").read_text())
    del raw["mlp_multiple_of"]
    with pytest.raises(ConfigError) as err:
        load_config([str(write(tmp_path, "7b.yml", {**raw, "train_iters": 10, "data_path": "d"}))])
    (issue,) = err.value.issues
    assert issue.key == "intermediate_size" and "11008" in issue.fix and "mlp_multiple_of" in issue.fix


def test_gpt_neox_mlp_formula():
    assert neox_swiglu_width(4096, 32768, None, 256) == (11008, 22016)  # LLaMA-7B
    assert neox_swiglu_width(4096, 14336, None, 14336) == (14336, 28672)  # llama3-8b-sft
    assert neox_swiglu_width(4096, None, None, 256) == (5632, 11264)  # 4h default, gated: 2/3 of it
    assert neox_swiglu_width(8192, 86016, None, 256) == (28672, 57344)  # Llama-3.1-70B written GPT-NeoX style


def test_llama3_8b_sft_config_loads_unchanged_and_builds_8b(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tok = tmp_path / "checkpoints/neox_converted/llama3-8b-instruct/tokenizer/tokenizer.json"
    tok.parent.mkdir(parents=True)
    tiny_tokenizer(tok)
    cfg = load_config([str(NEOX / "llama3_8b_sft.yml")], available_devices=8).config
    assert cfg.pack_impl == "unpacked"  # upstream's value: one conversation per sample (megatron/data/packing.py)
    assert cfg.intermediate_size == 14336 and cfg.precision == "bf16" and cfg.log_phase_times
    assert params(cfg, 128256) == LLAMA3_8B
    assert cfg.tp == 4 and cfg.zero_optimization.stage == 1


def test_gpt2_125m_config_is_refused_for_what_differs_only(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config([str(NEOX / "125M.yml"), str(NEOX / "local_setup.yml")])
    keys = set(err.value.keys())
    # GPT-NeoX's defaults the file relies on: GELU, and RMSNorm's epsilon does not apply (LayerNorm)
    assert keys == {"norm", "fp16", "intermediate_size", "merge_file", "vocab_file", "activation"}, \
        err.value.format()
    text = err.value.format()
    assert "precision: bf16" in text and "HFTokenizer" in text and "did you mean" not in text


MISTAKES = [
    # (GPT-NeoX-style mistake, key that must be named, words of the fix)
    ({"precision": "float16"}, "precision", "bf16"),
    ({"fp16": {"enabled": True, "loss_scale": 0}}, "fp16", "precision: bf16"),
    ({"intermediate_size": 32768, "hidden_size": 4096, "num_attention_heads": 32, "num_kv_heads": 8},
     "intermediate_size", "mlp_multiple_of"),
    ({"mlp_multiple_of": 1, "intermediate_size": 32768}, "intermediate_size,mlp_multiple_of", "HF per-branch"),
    ({"attention_config": [[["local", "global"], 2]]}, "attention_config", "attention_backend"),
    ({"pos_emb": "alibi"}, "pos_emb", "rotary"),
    ({"tokenizer_type": "GPT2BPETokenizer"}, "tokenizer_type", "Llama3Tokenizer"),
    ({"tokenizer_type": "HFTokenizer", "vocab_file": "nowhere/tokenizer.json"}, "vocab_file", "tokenizer.json"),
    ({"comment": "x", "launcher": "pdsh"}, "comment", "slurm"),
    ({"train_impl": "dpo"}, "train_impl", "not implemented"),
    ({"use_mup": True}, "use_mup", "muP"),
    ({"gpt_j_residual": True}, "gpt_j_residual", "false"),
    ({"deepspeed_mpy": True}, "deepspeed_mpy", "remove it"),  # a typo of deepspeed_mpi: never "deepspeed_slurm"
    ({"zero_optimization": {"stage": 1, "cpu_offload": True}}, "zero_optimization.cpu_offload", "ZeRO-1"),
    ({"activation": "silu"}, "activation", "swiglu"),
    ({"weight_decay": 0.1, "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "weight_decay": 0.0}}},
     "optimizer.params.weight_decay", "top-level weight_decay"),
    ({"checkpoint_scale": "log"}, "checkpoint_scale", "checkpoint_factor"),
]


def tiny(**over):
    raw = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yml").read_text())
    return {**raw, "train_iters": 10, "data_path": "data/x", **over}


@pytest.mark.parametrize("over,key,words", MISTAKES, ids=[m[1] for m in MISTAKES])
def test_gpt_neox_mistakes_are_refused_naming_the_key(over, key, words, tmp_path):
    path = write(tmp_path, "bad.yml", tiny(**over))
    with pytest.raises(ConfigError) as err:
        load_config([str(path)])
    issues = [i for i in err.value.issues if i.key == key]
    assert issues, err.value.format()
    assert words in issues[0].fix + issues[0].message, issues[0].format()
    assert issues[0].file == str(path)
    for issue in err.value.issues:  # no suggestion of a key with another meaning
        assert "did you mean" not in issue.fix or close_spellings(issue.key, all_keys())


def test_deepy_refuses_gpt_neox_mistakes_before_launch_without_traceback(tmp_path):
    bad = tiny(**{"precision": "float16", "attention_config": [[["sparse_fixed"], 4]], "use_mup": True,
                  "tokenizer_type": "HFTokenizer", "vocab_file": str(tmp_path / "missing.json"),
                  "run_dir": str(tmp_path / "run")})
    proc = subprocess.run([sys.executable, str(ROOT / "deepy.py"), "train.py", str(write(tmp_path, "b.yml", bad)),
                           "--dry-run"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for key in ("precision", "attention_config", "use_mup", "vocab_file"):
        assert f"{key} = " in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_did_you_mean_only_for_close_spellings():
    keys = all_keys()
    assert close_spellings("num_layer", keys) == ["num_layers"]
    assert close_spellings("seq_lenght", keys) == ["seq_length"]
    for far in ("deepspeed_mpi", "use_checkpoint_lr_scheduler", "steps_per_print", "log_dir", "lr_decay_frac"):
        assert close_spellings(far, keys) == [], far


def test_every_gpt_neox_key_has_a_status_and_the_doc_table_is_current():
    from megatron.config.neox_compat import NEOX_SCHEMA_KEYS, handled_keys

    upstream = {k for line in (NEOX / "neox_args_keys.txt").read_text().splitlines() if not line.startswith("#")
                for k in line.split()}
    assert len(upstream) > 300
    assert upstream - handled_keys() == set()
    assert not set(TABLE) & set(NeoXConfig.model_fields) and NEOX_SCHEMA_KEYS <= set(NeoXConfig.model_fields)
    doc = (ROOT / "docs" / "config.md").read_text()
    assert render_table() in doc, "docs/config.md is stale: run `make docs-config`"


# ---- launcher commands and worker environments ------------------------------------------------------------------

def plan(tmp_path, environ=None, **keys):
    from megatron.launcher import plan_launch

    cfg = build_config(tiny(**keys))
    return plan_launch(cfg, "train.py", tmp_path / "config.yml", tmp_path, 0, str(ROOT), environ=environ or {})


def runner_args(launch):
    from deepspeed.launcher.runner import parse_args

    cmd = launch.cmd
    args = parse_args(cmd[cmd.index("deepspeed.launcher.runner") + 1:])  # SystemExit on any unknown flag
    assert args.user_script == "train.py" and args.user_args[0] == "--config"
    return args


def test_every_runner_command_is_parsed_by_deepspeeds_own_parser(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("gpu1 slots=8\ngpu2 slots=8\n")
    h = str(hostfile)
    local = runner_args(plan(tmp_path, num_gpus=2))
    assert local.hostfile == os.devnull and local.num_gpus == 2
    pdsh = runner_args(plan(tmp_path, hostfile=h, num_gpus=8, no_ssh_check=True, force_multi=True, master_addr="a"))
    assert (pdsh.launcher, pdsh.no_ssh_check, pdsh.force_multi, pdsh.master_addr) == ("pdsh", True, True, "a")
    slurm = runner_args(plan(tmp_path, {"SLURM_JOB_NODELIST": "gpu[1-2]"}, deepspeed_slurm=True, num_nodes=2,
                             num_gpus=8, comment="astro cpt"))
    assert slurm.launcher == "slurm" and slurm.no_ssh_check and slurm.master_addr == "gpu1"
    assert slurm.launcher_args == "'--comment=astro cpt'" and slurm.num_nodes == 2
    assert (tmp_path / "hostfile").read_text() == "gpu1 slots=8\ngpu2 slots=8\n"
    for mpi in ("openmpi", "mpich"):
        args = runner_args(plan(tmp_path, hostfile=h, launcher=mpi, num_gpus=None))
        assert (args.launcher, args.num_nodes, args.num_gpus, args.master_addr) == (mpi, -1, -1, "gpu1")
    with pytest.raises(ConfigError) as err:  # mpirun starts every slot: num_gpus cannot select fewer
        build_config(tiny(hostfile=h, launcher="openmpi", num_gpus=4))
    assert err.value.keys() == ["num_gpus,num_nodes"]
    dlts = runner_args(plan(tmp_path, {"DLTS_HOSTFILE": h, "MASTER_ADDR": "10.0.0.1"}, num_gpus=8))
    assert dlts.hostfile == h and dlts.master_addr == "10.0.0.1"
    inc = runner_args(plan(tmp_path, hostfile=h, include="gpu1:0,1@gpu2:0,1", num_gpus=None))
    assert inc.include == "gpu1:0,1@gpu2:0,1"


def test_slurm_launch_outside_an_allocation_is_refused(tmp_path):
    from megatron.launcher import LaunchError

    with pytest.raises(LaunchError, match="SLURM_JOB_NODELIST"):
        plan(tmp_path, {}, launcher="slurm", num_nodes=2, num_gpus=8)
    # A dry run outside the job shows the command the job will run, and says so.
    proc = subprocess.run([sys.executable, str(ROOT / "deepy.py"), "train.py", str(ROOT / "configs" /
                           "astrosage70b_cpt.yml"), "--dry-run"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120, env={k: v for k, v in os.environ.items() if not k.startswith("SLURM")})
    assert proc.returncode == 0, proc.stderr
    assert "not inside a SLURM job" in proc.stdout and "--launcher slurm" in proc.stdout
    assert not (tmp_path / "runs" / "astrosage70b_cpt" / "hostfile").exists()


def test_worker_environment_from_each_launcher():
    from megatron.launcher import expand_hostlist
    from megatron.parallel.launch_env import map_launcher_env

    assert expand_hostlist("gpu[007-009,012],cpu1,x[1-2]-ib") == ["gpu007", "gpu008", "gpu009", "gpu012", "cpu1",
                                                                  "x1-ib", "x2-ib"]
    slurm = {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "n[03-10]"}
    assert map_launcher_env(slurm) == "slurm"
    assert (slurm["RANK"], slurm["LOCAL_RANK"], slurm["WORLD_SIZE"], slurm["MASTER_ADDR"]) == ("9", "1", "16", "n03")
    ompi = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4",
            "MASTER_ADDR": "h0", "MASTER_PORT": "1234"}
    assert map_launcher_env(ompi) == "openmpi" and (ompi["RANK"], ompi["MASTER_PORT"]) == ("3", "1234")
    pmi = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MASTER_ADDR": "h0"}
    assert map_launcher_env(pmi) == "mpich" and pmi["LOCAL_RANK"] == "0"
    launched = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}  # pdsh inside sbatch
    assert map_launcher_env(launched) is None and launched["RANK"] == "1"
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        map_launcher_env({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})


def test_astrosage_launch_block_is_a_slurm_launch_from_the_allocation(tmp_path):
    cfg = load_config([str(ROOT / "configs" / "astrosage70b_cpt.yml")]).config
    assert cfg.deepspeed_slurm and cfg.launcher == "slurm" and cfg.hostfile is None
    from megatron.launcher import plan_launch

    env = {"SLURM_JOB_NODELIST": "frontier[00001-00256]", "SLURM_JOB_ID": "1"}
    launch = plan_launch(cfg, "train.py", tmp_path / "c.yml", tmp_path, 0, str(ROOT), environ=env)
    args = runner_args(launch)
    assert args.num_nodes == 256 and args.num_gpus == 8 and args.master_addr == "frontier00001"
    assert len((tmp_path / "hostfile").read_text().splitlines()) == 256


# ---- helpers ----------------------------------------------------------------------------------------------------

def write(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def tiny_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<|begin_of_text|>", "<|end_of_text|>", "hello", "world", "[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    json.loads(path.read_text())


def test_pdsh_stop_command_signals_only_the_workers(tmp_path):
    """The pkill that deepy.py sends through pdsh reaches the workers of this run and nothing around them (a
    SIGUSR1 to DeepSpeed's per-node launch process would kill it)."""
    import signal
    import time

    from megatron.launcher import Launch, stop_commands

    config = str(tmp_path / "run" / "config.yml")
    script = tmp_path / "train.py"
    # Like the trainer, it only notes the signal (both fake hosts are this machine: it arrives twice).
    script.write_text("import signal, sys, time\ngot = []\nsignal.signal(signal.SIGUSR1, lambda *a: got.append(1))\n"
                      "print('ready', flush=True)\nend = time.time() + 60\n"
                      "while not got and time.time() < end:\n    time.sleep(0.05)\nsys.exit(0 if got else 1)\n")
    worker = subprocess.Popen([sys.executable, "-u", str(script), "--local_rank=0", "--config", config],
                              stdout=subprocess.PIPE, text=True)
    # DeepSpeed's launch: its command line ends with the same script and config; SIGUSR1 would kill it.
    launch_like = subprocess.Popen([sys.executable, "-u", "-c", "import time; time.sleep(60)", "-m",
                                    "deepspeed.launcher.launch", str(script), "--config", config])
    other = subprocess.Popen([sys.executable, "-u", str(script), "--local_rank=0", "--config", config + ".other"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "ready" and other.stdout.readline().strip() == "ready"
        launch = Launch(cmd=[], env={**os.environ, "PATH": f"{Path(__file__).parent / 'launchers' / 'bin'}"
                                     f"{os.pathsep}{os.environ['PATH']}"}, launcher="pdsh", hosts=["n0", "n1"])
        (cmd,) = stop_commands(launch, "train.py", config)
        subprocess.run(cmd, env=launch.env, timeout=60, check=False)
        assert worker.wait(timeout=30) == 0  # got SIGUSR1
        time.sleep(0.5)
        assert launch_like.poll() is None and other.poll() is None
    finally:
        for p in (worker, launch_like, other):
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
