"""Config system: defaults → file → CLI, validation errors, save/load, resume rules."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import configurator
from configurator import build_config, load_config, parse_overrides, resolve_config, save_config
from utils.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def resolve(*argv: str):
    return resolve_config(list(argv))


def test_defaults_and_cli_overrides():
    cfg = resolve("--learning_rate=3e-4", "--max_iters=12", "--compile", "--dtype=bfloat16")
    assert cfg.optim.learning_rate == 3e-4
    assert cfg.optim.max_iters == 12
    assert cfg.model.compile is True
    assert cfg.optim.dtype == "bfloat16"
    assert cfg.optim.weight_decay == configurator.OptimConfig().weight_decay


def test_keys_are_unique_and_documented():
    for key, (_, f) in configurator.KEYS.items():
        assert f.metadata["help"], key
    # Every key SPEC §10 names exists.
    spec_keys = """task_type data_dir tokenizer_dir out_dir init_from max_iters train_batch_size
    gradient_accumulation_steps max_seq_len dim n_layers n_heads n_kv_heads learning_rate min_lr
    warmup_iters lr_decay_iters weight_decay grad_clip dtype seed eval_interval eval_iters
    log_interval save_interval valid_ratio data_mix sft_type use_dataset_with_index dpo_beta
    dpo_loss_type ddp_impl use_distributed_optimizer overlap_grad_reduce overlap_param_gather
    overlap_optim_step comm_hook compile kernels resume""".split()
    assert set(spec_keys) <= set(configurator.KEYS)


def test_json_and_py_config_files_then_cli(tmp_path):
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"learning_rate": 1e-3, "n_layers": 3, "compile": True}))
    py = tmp_path / "c.py"
    py.write_text("import math\nlearning_rate = 2e-3\n_private = 5\nmax_iters = 7\n")
    cfg = resolve(str(js), str(py), "--max_iters=9")
    assert cfg.optim.learning_rate == 2e-3  # the later file wins
    assert cfg.model.n_layers == 3 and cfg.model.compile is True
    assert cfg.optim.max_iters == 9  # CLI wins over files


@pytest.mark.parametrize(
    "arg, key, fragment",
    [
        ("--learning_rat=1e-3", "learning_rat", "did you mean 'learning_rate'"),
        ("--learning_rate=abc", "learning_rate", "expected a number"),
        ("--dtype=float8", "dtype", "float32, bfloat16, float16"),
        ("--train_batch_size=-4", "train_batch_size", "must be ≥ 1"),
        ("--max_iters=1.5", "max_iters", "expected an integer"),
        ("--compile=maybe", "compile", "true or false"),
        ("--max_iters", "max_iters", "needs a value"),
    ],
)
def test_bad_keys_and_values_name_the_key(arg, key, fragment):
    with pytest.raises(ConfigError) as e:
        resolve(arg)
    assert key in str(e.value) and fragment in str(e.value)
    assert e.value.exit_code == 2


def test_bad_key_in_config_file(tmp_path):
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"n_layer": 3}))
    with pytest.raises(ConfigError, match=r"n_layer.*did you mean 'n_layers'"):
        resolve(str(js))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(str(tmp_path / "missing.json"))


def test_cross_key_validation():
    with pytest.raises(ConfigError, match="min_lr"):
        resolve("--learning_rate=1e-4", "--min_lr=1e-3")
    with pytest.raises(ConfigError, match="valid_ratio"):
        resolve("--valid_ratio=1.0")
    with pytest.raises(ConfigError, match="lr_decay_iters"):
        resolve("--warmup_iters=10", "--lr_decay_iters=5")


def test_save_and_load_round_trip(tmp_path):
    cfg = resolve("--n_layers=3", "--dtype=float16", f"--out_dir={tmp_path / 'run'}")
    path = save_config(cfg, cfg.ckpt.out_dir)
    assert path.name == "exp_config.json"
    assert load_config(path) == cfg
    assert load_config(path.parent) == cfg


def test_resume_reloads_saved_config_and_allows_only_safe_overrides(tmp_path):
    run = tmp_path / "run"
    cfg = resolve("--n_layers=3", "--learning_rate=1e-3", f"--out_dir={run}")
    save_config(cfg, run)
    resumed = resolve("--resume", f"--out_dir={run}", "--max_iters=50", "--log_interval=2")
    assert resumed.model.n_layers == 3 and resumed.optim.learning_rate == 1e-3
    assert resumed.optim.max_iters == 50 and resumed.ckpt.log_interval == 2
    assert resumed.ckpt.resume is True
    with pytest.raises(ConfigError, match="learning_rate"):
        resolve("--resume", f"--out_dir={run}", "--learning_rate=5e-4")
    with pytest.raises(ConfigError, match="no saved config"):
        resolve("--resume", f"--out_dir={tmp_path / 'nothing'}")


def test_resume_checks_given_keys_against_the_saved_config_not_the_defaults(tmp_path):
    run = tmp_path / "run"
    save_config(resolve("--learning_rate=1e-2", "--min_lr=1e-3", f"--out_dir={run}"), run)
    # min_lr=1e-3 exceeds the DEFAULT learning_rate, but equals the run's own setting
    resumed = resolve("--resume", f"--out_dir={run}", "--min_lr=1e-3")
    assert resumed.optim.min_lr == 1e-3 and resumed.optim.learning_rate == 1e-2


def test_input_paths_are_saved_absolute_and_resume_compares_them_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    args = ["--data_dir=data", "--tokenizer_dir=./tok", "--data_mix=a:0.7,b/c:0.3", "--out_dir=run"]
    save_config(resolve(*args), "run")
    saved = load_config(tmp_path / "run")
    assert saved.data.data_dir == str(tmp_path / "data")
    assert saved.data.tokenizer_dir == str(tmp_path / "tok")
    assert saved.data.data_mix == f"{tmp_path / 'a'}:0.7,{tmp_path / 'b' / 'c'}:0.3"
    assert saved.task.init_from == ""  # unset stays unset
    resumed = resolve(*args, "--resume")  # the same relative paths are not a change
    assert resumed.data.data_dir == str(tmp_path / "data")
    with pytest.raises(ConfigError, match="data_dir"):
        resolve("--resume", "--out_dir=run", "--data_dir=other")


def test_a_fresh_run_into_a_run_dir_is_refused(tmp_path):
    run = tmp_path / "run"
    save_config(resolve(f"--out_dir={run}"), run)
    with pytest.raises(ConfigError, match="already holds a training run.*--resume"):
        resolve(f"--out_dir={run}")


def test_parse_overrides_order():
    files, overrides = parse_overrides(["--max_iters=3", "--max_iters=4"])
    assert files == [] and overrides["max_iters"][0] == "4"
    with pytest.raises(ConfigError, match="before"):
        parse_overrides(["--max_iters=3", "c.json"])


def test_markdown_reference_lists_every_key():
    ref = configurator.markdown_reference()
    for key in configurator.KEYS:
        assert f"`{key}`" in ref


def run_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )


def test_train_cli_help_lists_every_key(tmp_path):
    r = run_train("--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for key in configurator.KEYS:
        assert f"--{key}=" in r.stdout


@pytest.mark.parametrize(
    "arg, key",
    [("--learning_rat=1e-3", "learning_rate"), ("--learning_rate=abc", "learning_rate"),
     ("--dtype=float8", "dtype"), ("--train_batch_size=-1", "train_batch_size")],
)
def test_train_cli_config_errors_exit_2_without_traceback_or_output(tmp_path, arg, key):
    out = tmp_path / "run"
    r = run_train(arg, f"--out_dir={out}", cwd=tmp_path)
    assert r.returncode == 2
    assert key in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
