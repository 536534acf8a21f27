"""python -m utils.export_hf: the exported directory loads in transformers with the same logits."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from model.configuration_z2all import Z2allConfig
from model.modeling_z2all import Z2allForCausalLM
from utils.errors import ConfigError
from utils.export_hf import export_hf, main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def checkpoint(tmp_path) -> tuple[Z2allForCausalLM, Path]:
    torch.manual_seed(0)
    model = Z2allForCausalLM(
        Z2allConfig.from_preset(
            "debug", tie_word_embeddings=True, initializer_range=0.3, kernels="torch"
        )
    ).eval()
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_export_loads_in_transformers_with_same_logits_and_tokenizer(
    checkpoint, tmp_path, tokenizer_dir
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, ckpt = checkpoint
    main([f"--out_dir={ckpt}", f"--hf_dir={tmp_path / 'hf'}", f"--tokenizer_dir={tokenizer_dir}"])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        assert (hf(x).logits - model(x).logits).abs().max() <= 1e-5
    text = "Hello, 世界"
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
    # transformers' generate() ends a chat reply at <|im_end|>, as our sample.py --chat does
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in hf.generation_config.eos_token_id and tok.eos_token_id in hf.generation_config.eos_token_id
    assert hf.generation_config.pad_token_id == tok.pad_token_id


def test_export_from_a_run_dir_uses_the_newest_checkpoint_and_the_saved_tokenizer(
    checkpoint, tmp_path, monkeypatch, tokenizer_dir
):
    model, ckpt = checkpoint
    run = tmp_path / "run"
    run.mkdir()
    (run / "exp_config.json").write_text("{}")
    fake_ckpt = types.ModuleType("utils.checkpoint")
    fake_ckpt.latest_model_dir = lambda out_dir: ckpt
    monkeypatch.setitem(sys.modules, "utils.checkpoint", fake_ckpt)
    fake_cfg = types.ModuleType("configurator")
    fake_cfg.load_config = lambda d: types.SimpleNamespace(
        to_flat=lambda: {"tokenizer_dir": str(tokenizer_dir)}
    )
    monkeypatch.setitem(sys.modules, "configurator", fake_cfg)
    dest = export_hf(run, tmp_path / "hf", dtype=torch.bfloat16)
    assert (dest / "tokenizer.json").is_file()
    loaded = Z2allForCausalLM.from_pretrained(dest, dtype=None)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(
        loaded.lm_head.weight.float(), model.lm_head.weight.bfloat16().float()
    )


def test_cli_errors_print_one_line_and_exit_nonzero(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "utils.export_hf",
            f"--out_dir={tmp_path}",
            f"--hf_dir={tmp_path / 'hf'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: ") and "not a model directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_hf_dir_that_is_a_file_or_a_run_dir_is_refused(checkpoint, tmp_path):
    _, ckpt = checkpoint
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "exp_config.json").write_text("{}")
    for dest, match in ((a_file, "existing file"), (run_dir, "run directory")):
        with pytest.raises(ConfigError, match=match):
            main([f"--out_dir={ckpt}", f"--hf_dir={dest}"])
    assert a_file.read_text() == "keep me" and not (run_dir / "config.json").exists()
