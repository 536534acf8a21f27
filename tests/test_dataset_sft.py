"""dataset/dataset_sft.py + data_preprocess/pretokenize_sft_data.py on a small mixed-format corpus."""

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import data_preprocess.pretokenize_sft_data as cli
import dataset.dataset_sft as sft
from data.build_sft_data import TASKS, TIERS, build, exact_match, select_tasks
from data_preprocess.pretokenize_sft_data import pretokenize_sft
from dataset.dataset_sft import SFTDataset, is_heldout, pack_greedy, sft_collate
from tokenizer.tokenization import load_tokenizer
from utils.conversation import IGNORE_INDEX, encode_conversation, record_to_messages
from utils.errors import DataError, run_cli

MAX_SEQ_LEN = 160

MESSAGES = [
    {
        "messages": [
            {"role": "user", "content": f"What is {a} + {a}?"},
            {"role": "assistant", "content": str(2 * a)},
        ]
    }
    for a in range(8)
] + [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hi"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "中文呢？"},
            {"role": "assistant", "content": "你好"},
        ]
    },
    # Too long for MAX_SEQ_LEN: older rounds are dropped, the last reply is cut.
    {
        "messages": [
            {"role": "user", "content": "tell me a long story"},
            {"role": "assistant", "content": "once upon a time " * 30},
        ]
    },
]
SHAREGPT = [
    {
        "conversations": [
            {"from": "human", "value": f"Reverse {w}"},
            {"from": "gpt", "value": w[::-1]},
        ]
    }
    for w in ("abc", "hello", "zero")
]
INSTRUCTION = [
    {"instruction": "Uppercase the word.", "input": w, "output": w.upper()} for w in ("cat", "dog")
]
HELDOUT = [{"instruction": f"Double {n}", "output": str(2 * n)} for n in (11, 12, 13)]


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_raw")
    with open(d / "chat.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in MESSAGES)
    (d / "sub").mkdir()
    (d / "sub" / "share.json").write_text(json.dumps(SHAREGPT), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(INSTRUCTION), d / "sub" / "instr.parquet")
    with open(d / "heldout.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in HELDOUT)
    return d


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def pretok_dir(raw_dir, tokenizer_dir, tmp_path_factory):
    return pretokenize_sft(
        raw_dir, tokenizer_dir, MAX_SEQ_LEN, tmp_path_factory.mktemp("pre") / "out"
    )


def _online(raw_dir, tokenizer_dir, tmp_path, split="train", **kw):
    return SFTDataset(
        raw_dir, MAX_SEQ_LEN, split, tokenizer_dir=tokenizer_dir, cache_dir=tmp_path / "cache", **kw
    )


def test_samples_equal_encode_conversation_of_each_record(raw_dir, tokenizer_dir, tok, tmp_path):
    # File order is sorted: chat.jsonl, sub/instr.parquet, sub/share.json (heldout.jsonl is valid).
    records = MESSAGES + INSTRUCTION + SHAREGPT
    ds = _online(raw_dir, tokenizer_dir, tmp_path)
    assert len(ds) == len(records)
    for j, record in enumerate(records):
        ids, labels = encode_conversation(
            tok, record_to_messages(record, "x"), max_len=MAX_SEQ_LEN + 1
        )
        got_ids, got_labels = ds.sample(j)
        assert got_ids.tolist() == ids and got_labels.tolist() == labels
        item = ds[j]
        assert item["input_ids"].tolist() == ids[:-1] and item["labels"].tolist() == labels[1:]
    assert len(ds.sample(len(MESSAGES) - 1)[0]) == MAX_SEQ_LEN + 1  # the long one was truncated


def test_pretokenized_equals_online(raw_dir, tokenizer_dir, pretok_dir, tmp_path):
    for split in ("train", "valid"):
        for packing in (False, True):
            online = _online(raw_dir, tokenizer_dir, tmp_path, split, packing=packing)
            pre = SFTDataset(pretok_dir, MAX_SEQ_LEN, split, packing=packing)
            assert len(online) == len(pre) > 0
            for i in range(len(online)):
                a, b = online[i], pre[i]
                assert a.keys() == b.keys()
                assert all(torch.equal(a[k], b[k]) for k in a)


def test_heldout_split_and_instruction_labels(raw_dir, tokenizer_dir, tok, tmp_path):
    valid = _online(raw_dir, tokenizer_dir, tmp_path, "valid")
    assert len(valid) == len(HELDOUT)
    for j, record in enumerate(HELDOUT):
        item = valid[j]
        target = item["labels"][item["labels"] != IGNORE_INDEX].tolist()
        assert tok.decode(target) == record["output"] + "<|im_end|>"
    assert (
        is_heldout("heldout.jsonl")
        and is_heldout("valid-00001.parquet")
        and is_heldout("test_zh.json")
    )
    assert not is_heldout("train.jsonl") and not is_heldout("development.jsonl")


def test_minus_100_is_never_stored_in_the_token_file(pretok_dir):
    meta = json.loads((pretok_dir / "sft_meta.json").read_text())
    assert meta["dtype"] == "uint16"
    entry = next(e for e in meta["files"] if e["source"] == "chat.jsonl")
    ids = np.fromfile(pretok_dir / "chat.jsonl.ids.bin", dtype=np.uint16)
    mask = np.fromfile(pretok_dir / "chat.jsonl.mask.bin", dtype=np.uint8)
    assert len(ids) == len(mask) == entry["num_tokens"]
    assert set(np.unique(mask).tolist()) == {0, 1} and ids.max() < meta["vocab_size"]
    assert int(np.uint16(65436)) not in ids.tolist()  # -100 squeezed into uint16


def test_packing_never_crosses_samples(raw_dir, tokenizer_dir, tmp_path):
    plain = _online(raw_dir, tokenizer_dir, tmp_path)
    packed = _online(raw_dir, tokenizer_dir, tmp_path, packing=True)
    assert len(packed) < len(plain)
    j = 0
    for i in range(len(packed)):
        row = packed[i]
        assert len(row["input_ids"]) <= MAX_SEQ_LEN
        docs = row["doc_ids"]
        for d in docs.unique().tolist():
            sel = docs == d
            positions = sel.nonzero().flatten()
            assert torch.equal(
                positions, torch.arange(positions[0], positions[-1] + 1)
            )  # contiguous
            assert torch.equal(
                row["position_ids"][sel], torch.arange(int(sel.sum()))
            )  # restarts at 0
            assert torch.equal(row["input_ids"][sel], plain[j]["input_ids"])
            assert torch.equal(row["labels"][sel], plain[j]["labels"])
            j += 1
    assert j == len(plain)
    batch = packed.collate([packed[0], packed[len(packed) - 1]])
    assert (
        batch["input_ids"].shape
        == batch["doc_ids"].shape
        == (2, max(len(packed[0]["input_ids"]), len(packed[len(packed) - 1]["input_ids"])))
    )
    for b in range(2):
        real = batch["labels"][b] != IGNORE_INDEX
        pad = batch["input_ids"][b] == packed.pad_id
        # Padding is its own document, after all real ones; it has no labels.
        assert not (pad & real).any()
        if pad.any():
            assert batch["doc_ids"][b][pad].min() > batch["doc_ids"][b][~pad].max()


def test_collate_pads_with_pad_id_and_ignore_index():
    items = [
        {"input_ids": torch.tensor([7, 8, 9]), "labels": torch.tensor([-100, 9, 5])},
        {"input_ids": torch.tensor([4]), "labels": torch.tensor([6])},
    ]
    batch = sft_collate(items, pad_id=3, pad_to=5)
    assert batch["input_ids"].tolist() == [[7, 8, 9, 3, 3], [4, 3, 3, 3, 3]]
    assert batch["labels"].tolist() == [[-100, 9, 5, -100, -100], [6, -100, -100, -100, -100]]


def test_pack_greedy_example():
    assert pack_greedy([3, 4, 2, 5], 6) == [[0], [1, 2], [3]]
    assert pack_greedy([2, 2, 2], 6) == [[0, 1, 2]]


def test_online_cache_is_reused_and_keyed_by_max_len(raw_dir, tokenizer_dir, tmp_path, monkeypatch):
    first = _online(raw_dir, tokenizer_dir, tmp_path)

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again despite a valid cache")

    monkeypatch.setattr(sft, "tokenize_file", fail)
    again = _online(raw_dir, tokenizer_dir, tmp_path)
    assert all(torch.equal(first[i]["input_ids"], again[i]["input_ids"]) for i in range(len(first)))
    with pytest.raises(AssertionError, match="tokenized again"):
        SFTDataset(
            raw_dir, MAX_SEQ_LEN + 1, tokenizer_dir=tokenizer_dir, cache_dir=tmp_path / "cache"
        )


def test_valid_ratio_split_without_heldout_files(tmp_path, tokenizer_dir):
    d = tmp_path / "data"
    d.mkdir()
    with open(d / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in MESSAGES)
    train = SFTDataset(
        d,
        MAX_SEQ_LEN,
        "train",
        tokenizer_dir=tokenizer_dir,
        cache_dir=tmp_path / "c",
        valid_ratio=0.3,
    )
    valid = SFTDataset(
        d,
        MAX_SEQ_LEN,
        "valid",
        tokenizer_dir=tokenizer_dir,
        cache_dir=tmp_path / "c",
        valid_ratio=0.3,
    )
    assert len(valid) == 3 and len(train) == len(MESSAGES) - 3
    assert set(train.samples).isdisjoint(valid.samples)


def test_stale_or_mismatched_pretokenized_data_is_a_clear_error(pretok_dir, tmp_path):
    with pytest.raises(DataError, match=f"max_seq_len={MAX_SEQ_LEN}, but max_seq_len=64"):
        SFTDataset(pretok_dir, 64)
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(pretok_dir, broken)
    ids_file = broken / "chat.jsonl.ids.bin"
    ids_file.write_bytes(ids_file.read_bytes()[:-2])
    with pytest.raises(DataError, match="stale or truncated"):
        SFTDataset(broken, MAX_SEQ_LEN)
    idx_file = broken / "sub" / "share.json.idx"
    idx_file.write_bytes(b"NOTMAGIC" + idx_file.read_bytes()[8:])
    with pytest.raises(DataError, match="not a zero2all SFT index"):
        sft.read_samples(broken / "sub" / "share.json", np.dtype(np.uint16))


@pytest.mark.parametrize(
    "line,match",
    [
        ("{not json", r"bad\.jsonl:2: malformed JSON line"),
        (
            '{"messages": [{"role": "user", "content": "only a question"}]}',
            r"bad\.jsonl:2: conversation has no assistant",
        ),
        (
            '{"conversations": [{"from": "robot", "value": "x"}]}',
            r"bad\.jsonl:2: conversations\[0\]",
        ),
    ],
)
def test_malformed_record_names_file_and_line(tmp_path, tokenizer_dir, line, match):
    d = tmp_path / "data"
    d.mkdir()
    (d / "bad.jsonl").write_text(json.dumps(MESSAGES[0]) + "\n" + line + "\n")
    with pytest.raises(DataError, match=match):
        SFTDataset(d, MAX_SEQ_LEN, tokenizer_dir=tokenizer_dir, cache_dir=tmp_path / "c")


def test_a_byte_order_mark_is_not_a_malformed_line(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(MESSAGES[0]).encode() + b"\n")
    assert [record for _, record in sft.iter_records(path)] == [MESSAGES[0]]


def test_cli_writes_then_skips_and_reports_errors(raw_dir, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "cli_out"
    args = [
        f"--data_dir={raw_dir}",
        f"--tokenizer_dir={tokenizer_dir}",
        f"--max_seq_len={MAX_SEQ_LEN}",
        f"--out_dir={out}",
    ]
    cli.main(args)
    assert (out / "sft_meta.json").is_file() and (out / "sub" / "instr.parquet.idx").is_file()
    capsys.readouterr()
    cli.main(args)  # main() sets up logging to (captured) stderr
    assert "up to date" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: cli.main(["--data_dir=/nonexistent", *args[1:]]))
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "/nonexistent" in err and "Traceback" not in err


def test_a_rebuild_that_dies_half_way_leaves_no_valid_looking_directory(raw_dir, tokenizer_dir,
                                                                      tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text((raw_dir / "chat.jsonl").read_text("utf-8"), "utf-8")
    (raw / "b.jsonl").write_text("{not json\n", "utf-8")  # sorted after a.jsonl
    out = tmp_path / "out"
    pretokenize_sft(raw_dir, tokenizer_dir, MAX_SEQ_LEN, out)
    with pytest.raises(DataError, match=r"b\.jsonl:1"):  # a.jsonl's files are rewritten first
        pretokenize_sft(raw, tokenizer_dir, 2 * MAX_SEQ_LEN, out, overwrite=True)
    assert not (out / "sft_meta.json").exists()
    with pytest.raises(DataError):
        SFTDataset(out, MAX_SEQ_LEN)


# --- the bundled data/sample_sft set (data/build_sft_data.py) ----------------------------------

ROOT = Path(__file__).resolve().parent.parent
NUM = re.compile(r"\d+")
QUOTED = re.compile(r"['“]([a-z]+)['”]")


def _words(question: str) -> list[str]:
    """The quoted words of a question, else its last word ("Uppercase this word: abc")."""
    return QUOTED.findall(question) or [question.split()[-1]]


def _check_answer(task: str, question: str, answer: str) -> None:
    """Recompute the answer from the question text alone (independent of the generator)."""
    nums = [int(n) for n in NUM.findall(question)]
    words = _words(question)
    expected = {
        "add": lambda: str(sum(nums)),
        "sub": lambda: str(max(nums) - min(nums)),  # "a - b" or "subtract b from a", a >= b
        "next": lambda: str(nums[0] + 1),
        "larger": lambda: str(max(nums)),
        "reverse": lambda: words[0][::-1],
        "upper": lambda: words[0].upper(),
        "count": lambda: str(max(words, key=len).count(min(words, key=len))),
        "parity": lambda: ("odd" if nums[0] % 2 else "even") if question.isascii()
        else ("奇数" if nums[0] % 2 else "偶数"),
        "first_digit": lambda: str(nums[0])[0],
        "last_digit": lambda: str(nums[0])[-1],
        "first_letter": lambda: words[0][0],
        "last_letter": lambda: words[0][-1],
    }
    if task != "convert":
        assert answer == expected[task](), (task, question, answer)


def _operands(task: str, question: str) -> tuple:
    return (task, tuple(sorted(NUM.findall(question))), tuple(sorted(_words(question))))


def test_bundled_sft_data_is_current_correct_and_heldout_disjoint():
    splits = build(seed=0)
    for split in ("train", "heldout"):
        path = ROOT / "data" / "sample_sft" / f"{split}.jsonl"
        on_disk = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert on_disk == splits[f"sft_{split}"], (
            f"{path} is stale: re-run python -m data.build_sft_data"
        )
    train_keys = set()
    for record in splits["sft_train"] + splits["dpo_train"]:
        if "prompt" in record:  # DPO
            prompt = record["prompt"]
            questions = [prompt if isinstance(prompt, str) else prompt[-1]["content"]]
        else:
            questions = [
                m["content"] for m in record_to_messages(record, "x") if m["role"] == "user"
            ]
        train_keys.update(_operands(record["task"], q) for q in questions)
    for record in splits["sft_heldout"]:
        question, answer = record["messages"][0]["content"], record["messages"][1]["content"]
        assert answer == record["answer"]
        _check_answer(record["task"], question, answer)
        if record["task"] != "convert":  # unit names are not in the operand key
            assert _operands(record["task"], question) not in train_keys, question
    tasks = {r["task"] for r in splits["sft_heldout"]}
    langs = {r["lang"] for r in splits["sft_heldout"]}
    assert tasks == set(TASKS) and len(tasks) == 13 and langs == {"en", "zh"}
    for record in splits["sft_train"][:500]:
        messages = record_to_messages(record, "x")
        _check_answer(record["task"], messages[-2]["content"], messages[-1]["content"])


def test_task_selection_by_tier_and_name(tmp_path):
    assert select_tasks("lookup") == TIERS["lookup"]
    assert select_tasks("next, lookup") == ["parity", "first_digit", "last_digit", "next"]
    assert select_tasks("all") == TASKS
    with pytest.raises(DataError, match="unknown task or tier 'multiply'"):
        select_tasks("lookup,multiply")
    splits = build(seed=1, tasks=["parity", "first_letter"])
    assert {r["task"] for split in splits.values() for r in split} == {"parity", "first_letter"}
    for record in splits["sft_heldout"]:
        _check_answer(record["task"], record["messages"][0]["content"], record["answer"])
    for record in splits["dpo_heldout"]:
        assert record["rejected"] != record["chosen"]


def test_a_task_without_enough_instances_is_an_error_not_a_hang(monkeypatch):
    import data.build_sft_data as generator

    monkeypatch.setattr(generator, "sample_instance", lambda rng, task: (task, rng.randint(0, 9)))
    with pytest.raises(DataError, match="'parity' has run out of distinct instances"):
        build(seed=0, tasks=["parity"])


def _convert_key(question: str, answer: str) -> tuple[int, int]:
    """(unit pair, amount) of a convert question, read from its text and answer."""
    from data.build_sft_data import UNITS

    unit = answer.lstrip("0123456789").strip()
    index = next(i for i, u in enumerate(UNITS) if unit in (u[1], u[3]))
    return index, int(NUM.findall(question)[0])


def test_convert_alone_is_scaled_to_its_instance_space(caplog):
    with caplog.at_level("WARNING", logger="build_sft_data"):
        splits = build(seed=0, tasks=["convert"])  # 7,600 records > 5,994 instances
    from data.build_sft_data import INSTANCE_SPACE, MAX_FILL

    assert "'convert' has only 5994 distinct instances" in caplog.text
    sizes = {name: len(records) for name, records in splits.items()}
    assert sum(sizes.values()) <= MAX_FILL * INSTANCE_SPACE["convert"]
    assert sizes["sft_train"] > 3000 and sizes["sft_heldout"] > 250
    default = {"sft_train": 5000, "sft_heldout": 400, "dpo_train": 2000, "dpo_heldout": 200}
    ratios = [sizes[split] / n for split, n in default.items()]
    assert max(ratios) - min(ratios) < 0.01  # one factor for every split
    keys = {}
    for name, records in splits.items():
        keys[name] = []
        for record in records:
            assert record["task"] == "convert"
            if "prompt" in record:
                prompt = record["prompt"]
                question = prompt if isinstance(prompt, str) else prompt[-1]["content"]
                answer = record["chosen"]
            else:
                messages = record_to_messages(record, "x")
                question, answer = messages[-2]["content"], messages[-1]["content"]
            keys[name].append(_convert_key(question, answer))
    everything = [k for split in keys.values() for k in split]
    assert len(set(everything)) == len(everything)  # no instance twice, held-out disjoint
    for record in splits["sft_heldout"]:
        question, answer = record["messages"][0]["content"], record["answer"]
        unit, amount = _convert_key(question, answer)
        assert answer.startswith(str(amount * [1000, 100, 1000, 60, 60, 1000][unit]))


def test_split_sizes_change_only_for_selections_short_of_instances():
    from data.build_sft_data import split_sizes

    default = {"sft_heldout": 400, "dpo_heldout": 200, "sft_train": 5000, "dpo_train": 2000}
    for tasks in (TASKS, ["next"], ["convert", "next"], TIERS["copy"]):
        assert split_sizes(tasks) == default, tasks
    assert sum(split_sizes(["convert"]).values()) < 7600


def test_instance_space_matches_the_sampler():
    import random

    from data.build_sft_data import INSTANCE_SPACE, sample_instance

    rng = random.Random(0)
    for task in ("convert", "next"):  # small enough to enumerate by drawing
        drawn = {sample_instance(rng, task) for _ in range(200_000)}
        assert len(drawn) == INSTANCE_SPACE[task], task


def test_tasks_help_names_every_tier(capsys):
    from data.build_sft_data import main

    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "tiers (lookup, spell, copy, compute)" in help_text


def test_bundled_sft_data_loads(tokenizer_dir, tmp_path):
    ds = SFTDataset(
        ROOT / "data" / "sample_sft", 256, "valid", tokenizer_dir=tokenizer_dir, cache_dir=tmp_path
    )
    assert len(ds) == 400


def test_exact_match():
    assert exact_match(" 168\n", "168") and exact_match("5000  meters", "5000 meters")
    assert not exact_match("169", "168") and not exact_match("abc", "ABC")


def test_packed_rows_give_each_sample_its_unpacked_logits(raw_dir, tokenizer_dir, tmp_path):
    """End to end with the project's model: packing changes nothing a sample sees."""
    modeling = pytest.importorskip("model.modeling_z2all")
    from model.configuration_z2all import Z2allConfig

    torch.manual_seed(0)
    config = Z2allConfig(
        vocab_size=1024,
        dim=32,
        n_layers=2,
        n_heads=4,
        multiple_of=16,
        max_seq_len=MAX_SEQ_LEN,
        kernels="torch",
    )
    model = modeling.Z2allForCausalLM(config).eval()
    plain = _online(raw_dir, tokenizer_dir, tmp_path)
    packed = _online(raw_dir, tokenizer_dir, tmp_path, packing=True)
    batch = packed.collate([packed[i] for i in range(len(packed))])
    with torch.no_grad():
        logits = model(
            batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"]
        ).logits
        j = 0
        for b, pack in enumerate(packed.packs):
            for d in range(len(pack)):
                sel = batch["doc_ids"][b] == d
                alone = model(plain[j]["input_ids"][None]).logits[0]
                torch.testing.assert_close(logits[b][sel], alone, rtol=1e-4, atol=1e-5)
                j += 1


def test_sft_type_insists_on_one_record_format(tmp_path):
    from dataset.dataset_sft import check_record_format
    from utils.errors import DataError

    (tmp_path / "a.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        '{"instruction": "say hi", "input": "", "output": "hi"}\n'
    )
    check_record_format(tmp_path, "auto")
    with pytest.raises(DataError, match=r"a.jsonl:2: sft_type=conversation expects"):
        check_record_format(tmp_path, "conversation")
    with pytest.raises(DataError, match=r"a.jsonl:1: sft_type=instruction expects"):
        check_record_format(tmp_path, "instruction")
