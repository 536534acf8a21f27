"""The kernel seam: selection rules, torch references vs independent formulas, attention layouts."""

import importlib.util

import pytest
import torch

from model.kernels import _on_cuda, get_kernels, torch_ref
from model.kernels.attention import (
    build_attention_layout,
    cu_seqlens_from_doc_ids,
    positions_from_doc_ids,
    sdpa_attention,
)
from utils.errors import ConfigError

# ---- selection ----------------------------------------------------------------------------------


def test_torch_mode_uses_references_and_sdpa():
    k = get_kernels("torch")
    assert dict(k.backends) == {
        "rms_norm": "torch",
        "apply_rotary": "torch",
        "swiglu": "torch",
        "linear_cross_entropy": "torch",
        "attention": "sdpa",
    }
    assert k.rms_norm is torch_ref.rms_norm and k.attention is sdpa_attention


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU choice")
def test_auto_on_cpu_is_torch():
    assert set(get_kernels("auto").backends.values()) == {"torch", "sdpa"}


def test_triton_without_cuda_or_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        get_kernels("triton")


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="kernels='fast'"):
        get_kernels("fast")


def test_auto_dispatch_runs_reference_on_cpu_tensors():
    def fused(x):
        raise AssertionError("fused op called on a CPU tensor")

    op = _on_cuda(fused, lambda x: x + 1)
    assert op(torch.zeros(2)).tolist() == [1.0, 1.0]


# ---- torch references against independent formulas ----------------------------------------------


def test_rms_norm_matches_hf_llama():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(3, 5, 48)
    hf = LlamaRMSNorm(48, eps=1e-6)
    hf.weight.data.normal_()
    torch.testing.assert_close(torch_ref.rms_norm(x, hf.weight, 1e-6), hf(x), rtol=0, atol=0)
    xb = x.bfloat16()  # bf16 input: statistics in fp32, cast back before the weight
    torch.testing.assert_close(torch_ref.rms_norm(xb, hf.weight, 1e-6), hf(xb), rtol=0, atol=0)


def test_rotary_matches_hf_rotate_half():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, T, H, Dh = 2, 7, 3, 16
    q, k = torch.randn(B, T, H, Dh), torch.randn(B, T, 1, Dh)
    angles = torch.randn(B, T, Dh // 2) * 5
    cos, sin = angles.cos(), angles.sin()
    full_cos, full_sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)  # HF: [B, T, Dh]
    hq, hk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), full_cos, full_sin)
    torch.testing.assert_close(
        torch_ref.apply_rotary(q, cos, sin), hq.transpose(1, 2), rtol=0, atol=0
    )
    torch.testing.assert_close(
        torch_ref.apply_rotary(k, cos, sin), hk.transpose(1, 2), rtol=0, atol=0
    )


def test_rotary_is_complex_rotation_of_half_split_pairs():
    """RoPE as in the paper: pair (x[i], x[i + Dh/2]) is a complex number rotated by angle_i.
    (Meta's checkpoints pair (x[2i], x[2i+1]) instead; HF permutes q/k rows into our layout.)"""
    B, T, H, Dh = 1, 5, 2, 8
    x = torch.randn(B, T, H, Dh, dtype=torch.float64)
    angles = torch.randn(B, T, Dh // 2, dtype=torch.float64)
    z = (
        torch.complex(x[..., : Dh // 2], x[..., Dh // 2 :])
        * torch.polar(torch.ones_like(angles), angles)[:, :, None]
    )
    expected = torch.cat((z.real, z.imag), -1)
    got = torch_ref.apply_rotary(x, angles.cos(), angles.sin())
    torch.testing.assert_close(got, expected)


def test_rotary_computes_in_fp32_for_bf16_inputs():
    x = torch.randn(1, 4, 2, 8).bfloat16()
    angles = torch.rand(1, 4, 4) * 2000  # large angles, as at late positions
    got = torch_ref.apply_rotary(x, angles.cos(), angles.sin())
    assert got.dtype == torch.bfloat16
    ref = torch_ref.apply_rotary(x.double(), angles.double().cos(), angles.double().sin())
    torch.testing.assert_close(got.double(), ref, rtol=1e-2, atol=1e-2)


def test_swiglu_formula():
    g, u = torch.randn(4, 6), torch.randn(4, 6)
    torch.testing.assert_close(torch_ref.swiglu(g, u), g * torch.sigmoid(g) * u)


def test_linear_cross_entropy_is_sum_over_kept_rows():
    h, w = torch.randn(6, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    t = torch.tensor([1, 3, -100, 10, 0, -100])
    logits = h @ w.T
    manual = -sum(torch.log_softmax(logits[i], -1)[t[i]] for i in range(6) if t[i] != -100)
    got = torch_ref.linear_cross_entropy(h, w, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), manual, rtol=1e-6, atol=1e-6)
    assert torch_ref.linear_cross_entropy(h, w, torch.full((6,), -100)).item() == 0.0


# ---- attention layouts and SDPA -----------------------------------------------------------------


def naive_attention(q, k, v, allowed):
    """q [B, Tq, H, Dh], k/v [B, Tk, Hkv, Dh], allowed [B, Tq, Tk] bool: the textbook formula."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def test_positions_and_cu_seqlens_from_doc_ids():
    doc_ids = torch.tensor([[7, 7, 7, 9, 9, 7], [0, 0, 0, 0, 0, 0]])
    assert positions_from_doc_ids(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    cu, longest = cu_seqlens_from_doc_ids(doc_ids)
    assert cu.tolist() == [0, 3, 5, 6, 12] and cu.dtype == torch.int32 and longest == 6


def test_packed_layout_blocks_cross_document_attention():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 0]])  # three documents: the last 0 is a new one
    mask = build_attention_layout(6, doc_ids=doc_ids).mask[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_padded_layout_with_cache_offset():
    # 2 cached tokens, 2 new ones; row 0 has one left-padding token
    attn = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    mask = build_attention_layout(2, past_len=2, attention_mask=attn).mask[:, 0]
    assert mask[0].tolist() == [[False, True, True, False], [False, True, True, True]]
    assert mask[1].tolist() == [[True, True, True, False], [True, True, True, True]]
    assert build_attention_layout(1, past_len=5).mask is None  # decode step: every key


@pytest.mark.parametrize("n_kv", [4, 2])
def test_sdpa_matches_naive_attention(n_kv):
    B, T, H, Dh = 2, 9, 4, 8
    q, k, v = torch.randn(B, T, H, Dh), torch.randn(B, T, n_kv, Dh), torch.randn(B, T, n_kv, Dh)
    causal = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)
    torch.testing.assert_close(
        sdpa_attention(q, k, v, build_attention_layout(T)), naive_attention(q, k, v, causal)
    )
    doc_ids = torch.tensor([[0] * 4 + [1] * 5, [3] * 9])
    layout = build_attention_layout(T, doc_ids=doc_ids)
    torch.testing.assert_close(
        sdpa_attention(q, k, v, layout), naive_attention(q, k, v, layout.mask[:, 0])
    )


# ---- the Triton path through the seam (interpreter on CPU) --------------------------------------

TRITON_READY = importlib.util.find_spec("triton") is not None and all(
    importlib.util.find_spec(f"model.kernels.{m}") is not None
    for m in ("triton_rmsnorm", "triton_rope", "triton_swiglu", "triton_cross_entropy")
)


@pytest.mark.skipif(
    not TRITON_READY, reason="Triton or one of the Triton kernel modules is missing"
)
def test_model_with_triton_kernels_matches_torch_kernels():
    """The whole model through kernels=triton (interpreter on CPU) equals kernels=torch:
    logits, the fused-loss path and every gradient."""
    from model.configuration_z2all import Z2allConfig
    from model.modeling_z2all import Z2allForCausalLM

    if not torch.cuda.is_available():
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("needs TRITON_INTERPRET=1 on CPU (set by tests/conftest.py)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = dict(
        vocab_size=96,
        dim=48,
        n_layers=1,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=80,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    ref = Z2allForCausalLM(Z2allConfig(**cfg, kernels="torch")).to(device)
    fused = Z2allForCausalLM(Z2allConfig(**cfg, kernels="triton")).to(device)
    fused.load_state_dict(ref.state_dict())
    assert set(fused.kernels.backends.values()) - {"sdpa", "flash_attn"} == {"triton"}
    x = torch.randint(0, 96, (2, 7), device=device)
    y = torch.randint(0, 96, (2, 7), device=device)
    y[0, :3] = -100
    results = []
    for model in (ref, fused):
        out = model(x, labels=y)
        out.loss.backward()
        fused_loss = model(x, labels=y, return_logits=False).loss
        torch.testing.assert_close(fused_loss, out.loss, rtol=1e-5, atol=1e-5)
        results.append((out.logits, {n: p.grad for n, p in model.named_parameters()}))
    (ref_logits, ref_grads), (logits, grads) = results
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_logits", [7 * 37, 2**22])  # several ragged chunks, and one
def test_torch_linear_cross_entropy_equals_the_plain_formula(monkeypatch, dtype, chunk_logits):
    """The chunked torch reference (hand-written backward) against F.cross_entropy on full logits."""
    from model.kernels import torch_ref

    monkeypatch.setattr(torch_ref, "CHUNK_LOGITS", chunk_logits)
    g = torch.Generator().manual_seed(0)
    N, D, V = 29, 11, 37
    h = torch.randn(N, D, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(V, D, generator=g, dtype=dtype, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=g)
    t[::4] = -100
    ours = torch_ref.linear_cross_entropy(h, w, t)
    (gh, gw) = torch.autograd.grad(ours * 1.7, (h, w))
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h2, w2).float(), t, reduction="sum")
    (rh, rw) = torch.autograd.grad(ref * 1.7, (h2, w2))
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.float(), ref.float(), **tol)
    torch.testing.assert_close(gh, rh, **tol)
    torch.testing.assert_close(gw, rw, **tol)
    all_ignored = torch.full((N,), -100)
    assert float(torch_ref.linear_cross_entropy(h, w, all_ignored).detach()) == 0.0
