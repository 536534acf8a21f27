"""The model against transformers' LlamaForCausalLM, plus its own invariants (fp32, CPU, tiny)."""

import dataclasses
import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from model.configuration_z2all import Z2allConfig, llama_ffn_dim
from model.flops import flops_per_token, parameter_report, peak_flops
from model.modeling_z2all import KVCache, Z2allForCausalLM, rope_cos_sin, rope_inv_freq
from utils.errors import ConfigError, DataError

V = 97  # odd vocab: catches shape mix-ups


def tiny(**overrides) -> Z2allConfig:
    """A debug model with a large init std, so attention is far from uniform and a RoPE or
    weight-layout mistake moves the logits by much more than the tolerance."""
    base = dict(
        vocab_size=V,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=96,
        initializer_range=0.3,
        kernels="torch",
        max_seq_len=64,
    )
    return Z2allConfig(**{**base, **overrides})


def assert_same_logits(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Two fp32 computations of the same logits (|logits| up to ~10 with the large init)
    through different attention kernels: equal to float rounding."""
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def shifted(x: torch.Tensor) -> torch.Tensor:
    """Targets for input x: the next token, -100 at the end (the model never shifts)."""
    return torch.cat((x[:, 1:], torch.full_like(x[:, :1], -100)), dim=1)


HF_CASES = {
    "mha-untied-theta1e4": dict(n_kv_heads=4),
    "gqa-tied-theta5e5": dict(tie_word_embeddings=True, rope_theta=5e5),
    "gqa-untied-linear": dict(rope_scaling={"type": "linear", "factor": 4.0}),
    "mha-tied-llama3": dict(
        n_kv_heads=4,
        tie_word_embeddings=True,
        rope_theta=5e5,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_logits_and_loss_match_transformers(case, tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = Z2allForCausalLM(tiny(**HF_CASES[case])).eval()
    model.save_pretrained(tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, V, (2, 40))
    with torch.no_grad():
        ours = model(x, labels=shifted(x))
        fused_path = model(x, labels=shifted(x), return_logits=False)
        theirs = hf(x, labels=x)  # HF shifts internally
    assert ours.logits.abs().max() > 1.0  # the comparison is not between near-zero numbers
    assert (ours.logits - theirs.logits).abs().max().item() <= 1e-5
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused_path.loss, ours.loss, rtol=1e-6, atol=1e-6)
    assert fused_path.logits is None and ours.num_tokens.item() == 2 * 39


def test_hf_to_ours_to_hf_round_trip_is_exact(tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_config = LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=64,
        rope_theta=5e5,
        tie_word_embeddings=False,
    )
    hf = LlamaForCausalLM(hf_config).eval()
    for p in hf.parameters():  # HF inits norms to 1; make every tensor distinct
        p.data.normal_(0, 0.3)
    hf.save_pretrained(tmp_path / "hf")
    ours = Z2allForCausalLM.from_pretrained(tmp_path / "hf", kernels="torch").eval()
    assert ours.config.rope_theta == 5e5 and ours.config.norm_eps == 1e-6
    ours.save_pretrained(tmp_path / "ours")
    a, b = (
        load_file(tmp_path / "hf" / "model.safetensors"),
        load_file(tmp_path / "ours" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    back = LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    x = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        assert torch.equal(back(x).logits, hf(x).logits)
        assert (ours(x).logits - hf(x).logits).abs().max() <= 1e-5


def test_tied_save_writes_one_matrix_and_reloads_tied(tmp_path):
    from safetensors.torch import load_file

    model = Z2allForCausalLM(tiny(tie_word_embeddings=True))
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is True
    loaded = Z2allForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert loaded.num_parameters() == model.num_parameters()


def test_from_pretrained_accepts_a_train_out_dir(tmp_path, monkeypatch):
    model = Z2allForCausalLM(tiny())
    model.save_pretrained(tmp_path / "ckpt" / "model")
    (tmp_path / "exp_config.json").write_text("{}")
    fake = types.ModuleType("utils.checkpoint")
    fake.latest_model_dir = lambda out_dir: out_dir / "ckpt" / "model"
    monkeypatch.setitem(sys.modules, "utils.checkpoint", fake)
    loaded = Z2allForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_from_pretrained_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="not a model directory"):
        Z2allForCausalLM.from_pretrained(tmp_path)
    Z2allForCausalLM(tiny()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(DataError, match=r"mlp\.\w+_proj\.weight has shape"):
        Z2allForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    with pytest.raises(ConfigError, match="hidden_act"):
        Z2allForCausalLM.from_pretrained(tmp_path)


# ---- loss semantics -----------------------------------------------------------------------------


def test_loss_is_mean_over_unignored_shifted_labels():
    torch.manual_seed(0)
    model = Z2allForCausalLM(tiny())
    x = torch.randint(0, V, (2, 10))
    y = shifted(x)
    y[1, :4] = -100
    out = model(x, labels=y)
    keep = y != -100
    manual = F.cross_entropy(out.logits[keep], y[keep])  # per-position, no shift
    torch.testing.assert_close(out.loss, manual)
    assert out.num_tokens.item() == keep.sum().item()
    total = model(x, labels=y, loss_reduction="sum")
    torch.testing.assert_close(total.loss, manual * keep.sum())
    assert model(x, labels=torch.full_like(x, -100)).loss.item() == 0.0


def test_mostly_ignored_labels_skip_lm_head_rows_with_same_loss_and_grads(monkeypatch):
    """SFT-like labels (replies only): the fused path sends only the labelled rows through the
    LM head, and gives the plain formula's loss and gradients."""
    torch.manual_seed(0)
    model = Z2allForCausalLM(tiny())
    x = torch.randint(0, V, (3, 16))
    y = torch.full_like(x, -100)
    y[:, 12:] = shifted(x)[:, 12:]  # at most 12 of 48 positions labelled
    y[2, 15] = -100
    rows_seen = []
    inner = model.kernels.linear_cross_entropy
    monkeypatch.setattr(model, "kernels", dataclasses.replace(
        model.kernels, linear_cross_entropy=lambda h, *a: rows_seen.append(len(h)) or inner(h, *a)))
    results = []
    for return_logits in (True, False):
        model.zero_grad()
        loss = model(x, labels=y, return_logits=return_logits).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert rows_seen == [int((y != -100).sum())] and rows_seen[0] < x.numel() // 2
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = Z2allForCausalLM(tiny())
    x = torch.randint(0, V, (2, 12))
    grads = []
    for flag in (False, True):
        model.config.gradient_checkpointing = flag
        model.zero_grad()
        model(x, labels=shifted(x), return_logits=False).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- masks: packing and padding -----------------------------------------------------------------


def test_packed_sequence_logits_equal_per_document_logits():
    torch.manual_seed(0)
    model = Z2allForCausalLM(tiny()).eval()
    lengths = [5, 9, 2]
    docs = [torch.randint(0, V, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        got = model(packed, doc_ids=doc_ids).logits
        expected = torch.cat([model(d).logits for d in docs], dim=1)
        assert_same_logits(got, expected)
        unpacked = model(packed).logits  # without doc_ids the later documents differ
        assert (unpacked[:, 5:] - expected[:, 5:]).abs().max() > 1e-2


def test_left_padded_rows_match_unpadded_rows():
    torch.manual_seed(0)
    model = Z2allForCausalLM(tiny()).eval()
    short, long = torch.randint(0, V, (1, 6)), torch.randint(0, V, (1, 10))
    batch = torch.cat((torch.cat((torch.full((1, 4), 3), short), 1), long))
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    with torch.no_grad():
        out = model(batch, attention_mask=mask).logits
        assert not out.isnan().any()
        assert_same_logits(out[0, 4:], model(short).logits[0])
        assert_same_logits(out[1], model(long).logits[0])


def test_kv_cache_prefill_then_steps_equal_full_forward():
    torch.manual_seed(0)
    model = Z2allForCausalLM(tiny()).eval()
    x = torch.randint(0, V, (3, 12))
    cache = model.make_kv_cache(3, 12)
    with torch.no_grad():
        full = model(x).logits
        parts = [model(x[:, :5], kv_cache=cache).logits, model(x[:, 5:8], kv_cache=cache).logits]
        parts += [model(x[:, t : t + 1], kv_cache=cache).logits for t in range(8, 12)]
    assert cache.length == 12 and cache.k.shape == (2, 3, 12, 2, 16)
    assert_same_logits(torch.cat(parts, 1), full)
    with pytest.raises(ValueError, match="KV cache full"):
        model(x[:, :1], kv_cache=cache)


def test_kv_cache_update_indexes_time_not_heads():
    cache = KVCache(tiny(), batch_size=2, max_len=8, device="cpu", dtype=torch.float32)
    k = torch.randn(2, 3, 2, 16)
    got_k, _ = cache.update(0, k, k)
    assert got_k.shape == (2, 3, 2, 16) and torch.equal(got_k, k)


# ---- RoPE numerics ------------------------------------------------------------------------------


def test_rope_cos_sin_stay_fp32_in_a_bf16_model():
    model = Z2allForCausalLM(tiny()).to(torch.bfloat16)
    cos, sin = rope_cos_sin(rope_inv_freq(model.config), torch.arange(2000, 2004)[None])
    assert cos.dtype == sin.dtype == torch.float32
    ref = 2000 * 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    torch.testing.assert_close(cos[0, 0].double(), ref.cos(), rtol=0, atol=1e-3)
    logits = model(torch.randint(0, V, (1, 8))).logits
    assert logits.dtype == torch.bfloat16 and logits.isfinite().all()


def test_linear_scaling_interpolates_positions():
    base, scaled = tiny(), tiny(rope_scaling={"type": "linear", "factor": 4.0})
    torch.testing.assert_close(rope_inv_freq(scaled), rope_inv_freq(base) / 4)


# ---- torch.compile ------------------------------------------------------------------------------


def test_compile_fullgraph_has_no_graph_breaks():
    """Dynamo traces the whole model (and so every block) as one graph; the eager backend
    skips code generation so this stays fast. The inductor run is the slow test below."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Z2allForCausalLM(tiny())
    x = torch.randint(0, V, (2, 8))
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]] * 2)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    for kwargs in ({}, {"doc_ids": doc_ids}, {"return_logits": False}):
        got, ref = compiled(x, labels=shifted(x), **kwargs), model(x, labels=shifted(x), **kwargs)
        torch.testing.assert_close(got.loss, ref.loss)


@pytest.mark.slow
def test_inductor_compiled_forward_matches_eager():
    torch.manual_seed(0)
    model = Z2allForCausalLM(tiny(n_layers=1)).eval()
    x = torch.randint(0, V, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(
            torch.compile(model)(x).logits, model(x).logits, rtol=1e-5, atol=1e-5
        )


# ---- config, presets, counting ------------------------------------------------------------------


def test_presets_and_ffn_rule():
    assert llama_ffn_dim(2048, 256) == 5632 and llama_ffn_dim(4096, 256) == 11008
    big = Z2allConfig.from_preset("1.7b")
    assert (big.dim, big.n_layers, big.n_heads, big.n_kv_heads, big.hidden_dim, big.vocab_size) == (
        2048,
        32,
        16,
        8,
        5632,
        64320,
    )
    assert Z2allConfig.from_preset("debug", vocab_size=1024).vocab_size == 1024
    with pytest.raises(ConfigError, match="unknown model preset"):
        Z2allConfig.from_preset("7b")
    with pytest.raises(ConfigError, match="n_kv_heads"):
        Z2allConfig.from_preset("debug", n_kv_heads=3)
    with pytest.raises(ConfigError, match="rope_scaling type 'yarn'"):
        tiny(rope_scaling={"type": "yarn", "factor": 2.0})


def test_parameter_count_of_the_1_7b_preset():
    with torch.device("meta"):
        model = Z2allForCausalLM(Z2allConfig.from_preset("1.7b"))
    # the original llm-zero2all run logged 1,773,404,160 weight-decayed (matrix) parameters
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    assert matrices == 1_773_404_160
    assert model.num_parameters() == matrices + 65 * 2048  # + 2 norms per layer + final norm
    assert model.num_parameters(exclude_embeddings=True) == model.num_parameters() - 64320 * 2048
    assert "total" in parameter_report(model)


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_formula(tied):
    model = Z2allForCausalLM(tiny(tie_word_embeddings=tied))
    # by hand: per layer q,o 64x64, k,v 64x32, MLP 3 x 64x96, two norms; final norm; LM head 97x64
    n = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 96 + 2 * 64) + 64 + V * 64
    assert model.num_parameters() == n + (0 if tied else V * 64)
    assert flops_per_token(model, seq_len=32) == 6 * n + 12 * 2 * 4 * 16 * 32


# torch.cuda.get_device_name() strings -> dense BF16 (FP16 for the V100) peak FLOP/s. Expected
# values are NVIDIA's data sheets, which print the 2:4-sparse figure (halved here): H100 and
# H200 sheets (SXM 1,979, NVL 1,671 TFLOPS sparse; H100 PCIe 1,513), L40 / L40S sheet
# (181.05 / 362.05 dense), L4 sheet (242 sparse), A100 sheet (312 dense).
DEVICE_PEAKS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA L4": 121e12,
    "NVIDIA L40": 181e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
}


@pytest.mark.parametrize("name", sorted(DEVICE_PEAKS))
def test_peak_flops_takes_the_most_specific_device_name(name, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops("cuda", torch.bfloat16) == DEVICE_PEAKS[name]
    assert peak_flops("cuda", torch.float32) is None  # fp32 matmuls have other peaks


def test_peak_flops_of_unknown_device_is_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA T4")
    assert peak_flops("cuda") is None
    assert peak_flops("cpu") is None
