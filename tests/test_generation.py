"""generate(): KV cache vs full recomputation, left padding, EOS, sampling filters; sample.py."""

import argparse

import pytest
import torch

import sample
from model.configuration_z2all import Z2allConfig
from model.generation import sample_next_token
from model.modeling_z2all import Z2allForCausalLM
from utils.errors import ConfigError, UserError

V = 97
PAD = 3


@pytest.fixture(scope="module")
def model() -> Z2allForCausalLM:
    torch.manual_seed(0)
    cfg = Z2allConfig(
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
    return Z2allForCausalLM(cfg).eval()


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


PROMPTS = [[5, 17, 33, 2 + 40, 8, 9, 60], [11, 12], [70, 71, 72, 73]]


def test_kv_cache_greedy_equals_full_recompute_for_left_padded_batch(model):
    ids, mask = left_padded(PROMPTS)
    cached = model.generate(ids, mask, max_new_tokens=12)
    full = model.generate(ids, mask, max_new_tokens=12, use_cache=False)
    assert cached.shape == (3, 7 + 12)
    assert torch.equal(cached, full)
    assert len({tuple(r) for r in cached[:, 7:].tolist()}) == 3  # not a degenerate constant output
    for i, prompt in enumerate(PROMPTS):  # each row as if generated alone, unpadded
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=12)
        assert torch.equal(alone[0, len(prompt) :], cached[i, 7:])


def test_eos_stops_each_row_and_pads_after_it(model):
    ids, mask = left_padded(PROMPTS)
    free = model.generate(ids, mask, max_new_tokens=10)[:, 7:]
    eos = free[0, 2].item()  # row 0 will produce this token as its third new token
    out = model.generate(ids, mask, max_new_tokens=10, eos_token_id=eos)[:, 7:]
    for row, ref in zip(out.tolist(), free.tolist(), strict=True):
        stop = ref.index(eos) if eos in ref else len(ref)
        assert row[: stop + 1] == ref[: stop + 1]
        assert all(t == PAD for t in row[stop + 1 :])
    assert out[0, 3:].eq(PAD).all()


def test_sampling_with_cache_equals_sampling_without(model):
    ids, mask = left_padded(PROMPTS)
    kwargs = dict(max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9)
    a = model.generate(ids, mask, generator=torch.Generator().manual_seed(1), **kwargs)
    b = model.generate(
        ids, mask, use_cache=False, generator=torch.Generator().manual_seed(1), **kwargs
    )
    assert torch.equal(a, b)


def test_right_padding_is_rejected(model):
    with pytest.raises(ValueError, match="LEFT-padded"):
        model.generate(torch.tensor([[5, 6, PAD]]), torch.tensor([[1, 1, 0]]), max_new_tokens=1)


def test_empty_prompt_is_rejected(model):
    with pytest.raises(ValueError, match="at least one token"):
        model.generate(torch.zeros(2, 0, dtype=torch.long), max_new_tokens=1)


def test_sampling_filters():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next_token(logits), greedy)
    assert torch.equal(sample_next_token(logits, temperature=1.0, top_k=1), greedy)
    assert torch.equal(sample_next_token(logits, temperature=1.0, top_p=1e-6), greedy)
    gen = torch.Generator().manual_seed(0)
    top5 = logits.topk(5, dim=-1).indices
    for _ in range(50):
        s = sample_next_token(logits, temperature=2.0, top_k=5, generator=gen)
        assert (top5 == s[:, None]).any(-1).all()
    # top_p: the nucleus of [0.5, 0.3, 0.15, 0.05] at p=0.7 is the first two tokens
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    seen = {
        sample_next_token(probs.log(), 1.0, top_p=0.7, generator=gen).item() for _ in range(200)
    }
    assert seen == {0, 1}


# ---- sample.py ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    """A tiny model saved with the test tokenizer's files next to it (as export_hf writes)."""
    from tokenizer.tokenization import load_tokenizer, padded_vocab_size
    from utils.export_hf import copy_tokenizer_files

    vocab = padded_vocab_size(len(load_tokenizer(tokenizer_dir)))
    torch.manual_seed(0)
    cfg = Z2allConfig.from_preset("debug", vocab_size=vocab, kernels="torch")
    path = tmp_path_factory.mktemp("sample_model")
    Z2allForCausalLM(cfg).save_pretrained(path)
    copy_tokenizer_files(tokenizer_dir, path)
    return path


def test_sample_cli_greedy_is_deterministic(model_dir, capsys):
    argv = [
        f"--model_dir={model_dir}",
        "--prompt=The quick brown",
        "--max_new_tokens=8",
        "--temperature=0",
    ]
    sample.main(argv)
    first = capsys.readouterr().out
    sample.main(argv)
    assert capsys.readouterr().out == first and first.startswith("The quick brown")


def test_sample_cli_chat_and_sampling(model_dir, capsys):
    sample.main(
        [
            f"--model_dir={model_dir}",
            "--chat",
            "--prompt=Hello <|im_end|> there",
            "--max_new_tokens=6",
            "--top_k=5",
            "--num_samples=2",
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    assert len([ln for ln in lines if ln.startswith("assistant> ")]) == 2


def test_sample_cli_errors_are_user_errors(tmp_path, model_dir):
    with pytest.raises(UserError, match="not a model directory"):
        sample.main([f"--model_dir={tmp_path}", "--prompt=x"])
    with pytest.raises(UserError, match="--prompt is required"):
        sample.main([f"--model_dir={model_dir}"])


@pytest.fixture
def generate_calls(monkeypatch) -> list[tuple[int, int]]:
    """(prompt length, returned length) of every Z2allForCausalLM.generate call in the test."""
    calls = []
    original = Z2allForCausalLM.generate

    def spy(self, input_ids, *args, **kwargs):
        out = original(self, input_ids, *args, **kwargs)
        calls.append((input_ids.shape[1], out.shape[1]))
        return out

    monkeypatch.setattr(Z2allForCausalLM, "generate", spy)
    return calls


# (prompt tokens, --max_new_tokens) -> (prompt tokens kept, new tokens) for max_seq_len 64:
# the prompt keeps max(64 - max_new_tokens, 32) tokens, new tokens fill what is left.
@pytest.mark.parametrize(
    "prompt_len, max_new, kept, new",
    [(5, 10, 5, 10), (100, 10, 54, 10), (5, 64, 5, 59), (5, 200, 5, 59), (100, 200, 32, 32)],
)
def test_complete_fits_prompt_and_new_tokens_into_max_seq_len(
    model, generate_calls, prompt_len, max_new, kept, new
):
    args = argparse.Namespace(
        max_new_tokens=max_new, num_samples=2, temperature=0.0, top_k=None, top_p=None
    )
    prompt = [t % V for t in range(prompt_len)]
    rows = sample.complete(model, prompt, args, eos_id=None, generator=torch.Generator())
    assert [len(r) for r in rows] == [new, new]
    assert generate_calls == [(kept, kept + new)]
    assert kept + new <= model.config.max_seq_len


def test_prompt_budget_without_room_is_a_config_error():
    assert sample.prompt_budget(max_new_tokens=200, max_seq_len=128) == 64
    with pytest.raises(ConfigError, match="max_seq_len=1"):
        sample.prompt_budget(max_new_tokens=1, max_seq_len=1)


@pytest.mark.parametrize("chat", [False, True])
def test_sample_cli_max_new_tokens_beyond_the_context(model_dir, generate_calls, chat, capsys):
    """The default --max_new_tokens=200 on a max_seq_len=128 model: fewer tokens, a warning."""
    argv = [f"--model_dir={model_dir}", "--prompt=Hello there", "--temperature=0"]
    sample.main(argv + ["--chat"] if chat else argv)
    captured = capsys.readouterr()
    assert captured.out.startswith("assistant> " if chat else "Hello there")
    assert "--max_new_tokens=200 exceeds the model's context (max_seq_len=128)" in captured.err
    ((prompt_len, total),) = generate_calls
    assert 0 < prompt_len < total <= 128
