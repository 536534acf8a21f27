"""data/get_txt_for_train_tokenizer.py: quotas, sampling, shards, summary, CLI errors."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.get_txt_for_train_tokenizer import allocate_quotas, list_sources, sample_text
from data.readers import ReadStats, iter_documents, list_data_files
from utils.errors import DataError

ROOT = Path(__file__).resolve().parent.parent


def test_allocate_quotas_water_filling() -> None:
    assert allocate_quotas({"a": 10, "b": 50, "c": 100}, 90) == {"a": 10, "b": 40, "c": 40}
    assert allocate_quotas({"a": 10, "b": 50}, 1000) == {"a": 10, "b": 50}
    assert allocate_quotas({"a": 30, "b": 30, "c": 30}, 60) == {"a": 20, "b": 20, "c": 20}
    assert allocate_quotas({"a": 0, "b": 100}, 50) == {"a": 0, "b": 50}
    quotas = allocate_quotas({"x": 7, "y": 1000, "z": 1000, "w": 5}, 101)
    assert quotas == {"x": 7, "y": 44, "z": 45, "w": 5} and sum(quotas.values()) == 101


def _make_corpus(root: Path) -> dict[str, list[str]]:
    """Three sources: a big English dir (jsonl + parquet), a small Chinese json, a txt file."""
    en = [f"english document {i} " + "lorem ipsum " * (i % 13) for i in range(600)]
    zh = [f"中文文档 {i}：" + "春眠不觉晓" * (i % 5 + 1) for i in range(40)]
    txt = [f"plain paragraph {i}" for i in range(30)]
    (root / "en").mkdir(parents=True)
    (root / "en" / "a.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in en[:300]) + "{broken\n", "utf-8")
    pq.write_table(pa.Table.from_pylist([{"text": t} for t in en[300:]]), root / "en" / "b.parquet")
    zh_records = [{"content": t} for t in zh]
    (root / "zh.json").write_text(json.dumps(zh_records, ensure_ascii=False), "utf-8")
    (root / "notes.txt").write_text("\n\n".join(txt) + "\n", "utf-8")
    return {"en": en, "zh.json": zh, "notes.txt": txt}


def _nbytes(texts: list[str]) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


def test_list_sources(tmp_path: Path) -> None:
    _make_corpus(tmp_path / "data")
    sources = list_sources(tmp_path / "data")
    assert sorted(sources) == ["en", "notes.txt", "zh.json"]
    assert [p.name for p in sources["en"]] == ["a.jsonl", "b.parquet"]


def test_sample_respects_quotas_and_takes_small_sources_whole(tmp_path: Path) -> None:
    corpus = _make_corpus(tmp_path / "data")
    max_mb = 0.012  # 12_000 bytes: far less than the English source
    out = tmp_path / "out"
    result = sample_text(tmp_path / "data", out, max_mb, shard_mb=0.004, seed=3)
    summaries = {s.source: s for s in result}
    sizes = {name: _nbytes(texts) for name, texts in corpus.items()}
    expected_quota = allocate_quotas(sizes, 12_000)
    for name, s in summaries.items():
        assert s.mb_available == pytest.approx(sizes[name] / 1e6)
        assert s.mb_quota == pytest.approx(expected_quota[name] / 1e6)
        assert s.mb_taken <= s.mb_quota + 1e-12
    # the small sources fit their share and are taken whole; English gets the rest
    assert summaries["zh.json"].docs_taken == 40 and summaries["notes.txt"].docs_taken == 30
    assert summaries["en"].mb_taken > 0.8 * summaries["en"].mb_quota

    shards = sorted(out.glob("shard_*.txt"))
    assert len(shards) == 3  # ceil(12_000 / 4_000)
    text = "\n\n".join(p.read_text("utf-8") for p in shards)
    got = Counter(d.strip() for d in text.split("\n\n") if d.strip())
    all_docs = {t.strip() for texts in corpus.values() for t in texts}
    assert set(got) <= all_docs and max(got.values()) == 1  # real docs, none duplicated
    assert sum(got.values()) == sum(s.docs_taken for s in summaries.values())
    assert {t.strip() for t in corpus["zh.json"]} <= set(got)
    # shuffled: sources are interleaved, not concatenated in reading order
    first = [d for d in text.split("\n\n")[:60]]
    assert any(d.startswith("中文") for d in first) and any(d.startswith("english") for d in first)

    summary = json.loads((out / "summary.jsonc").read_text("utf-8"))
    assert [s["source"] for s in summary["sources"]] == ["en", "notes.txt", "zh.json"]
    assert summary["shards"] == [p.name for p in shards]
    assert not (out / ".buckets").exists()


def test_output_dir_reads_back_as_the_shards_only(tmp_path: Path) -> None:
    """The README passes --output_dir on as train_tokenizer's --data_dir: the summary must not
    be read as training text."""
    _make_corpus(tmp_path / "data")
    out = tmp_path / "out"
    sample_text(tmp_path / "data", out, 0.01, shard_mb=0.004)
    shards = sorted(out.glob("shard_*.txt"))
    assert len(shards) == 3 and len(list(out.iterdir())) == 4  # + the summary
    assert list_data_files(out) == shards
    stats = ReadStats()
    for path in list_data_files(out):
        list(iter_documents(path, None, stats))
    assert stats.num_skipped == 0


def test_sample_is_deterministic_and_readable(tmp_path: Path) -> None:
    _make_corpus(tmp_path / "data")
    sample_text(tmp_path / "data", tmp_path / "a", 0.01, seed=7)
    sample_text(tmp_path / "data", tmp_path / "b", 0.01, seed=7)
    sample_text(tmp_path / "data", tmp_path / "c", 0.01, seed=8)
    shard = "shard_00000.txt"
    assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()
    assert (tmp_path / "a" / shard).read_bytes() != (tmp_path / "c" / shard).read_bytes()
    docs = list(iter_documents(tmp_path / "a" / shard))
    assert len(docs) > 50


def test_rerun_replaces_old_shards(tmp_path: Path) -> None:
    _make_corpus(tmp_path / "data")
    out = tmp_path / "out"
    sample_text(tmp_path / "data", out, 0.02, shard_mb=0.004)
    assert len(list(out.glob("shard_*.txt"))) == 5
    sample_text(tmp_path / "data", out, 0.02, shard_mb=1)
    assert [p.name for p in out.glob("shard_*.txt")] == ["shard_00000.txt"]


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        sample_text(tmp_path / "missing", tmp_path / "out", 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt/.jsonl/.json/.parquet files"):
        sample_text(tmp_path / "empty", tmp_path / "out", 1)
    _make_corpus(tmp_path / "data")
    with pytest.raises(DataError, match="inside --data_dir"):
        sample_text(tmp_path / "data", tmp_path / "data" / "out", 1)
    with pytest.raises(DataError, match="must be positive"):
        sample_text(tmp_path / "data", tmp_path / "out", 0)
    (tmp_path / "a_file").write_text("keep me")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "sub"):
        with pytest.raises(DataError, match="--output_dir=.*a_file exists and is not a directory"):
            sample_text(tmp_path / "data", out, 1)
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_cli(tmp_path: Path) -> None:
    _make_corpus(tmp_path / "data")
    cmd = [sys.executable, "-m", "data.get_txt_for_train_tokenizer",
           f"--data_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / 'out'}",
           "--max_mb=0.01", "--seed=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "zh.json" in proc.stdout and "total" in proc.stdout
    assert (tmp_path / "out" / "shard_00000.txt").is_file()

    cmd[3] = f"--data_dir={tmp_path / 'nope'}"
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: data directory") and "nope" in proc.stderr
    assert "Traceback" not in proc.stderr
