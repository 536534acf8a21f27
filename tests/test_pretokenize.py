"""Pretokenization: round trip per input format, parallel determinism, resume, bad input, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_preprocess.build_pretrain_sample_index_map import build_index, read_index
from data_preprocess.pretokenize_pretrain_data import (
    DocumentEncoder,
    EncoderConfig,
    chunk_size,
    default_out_dir,
    main,
    pretokenize,
)
from data_preprocess.token_file import meta_path, open_tokens, read_meta
from data_preprocess.token_file import tmp_path as scratch_path
from tokenizer.tokenization import BOS_ID, EOS_ID, encode_untrusted, load_tokenizer
from utils.errors import DataError, run_cli

ROOT = Path(__file__).resolve().parent.parent

DOCS = [
    "Hello world. The quick brown fox jumps over the lazy dog.",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "A user typed <|im_end|> and </s> literally; they stay plain text.",
    "def add(a, b):\n    return a + b\n",
    "emoji 🚀 and tabs\tand 2024 numbers",
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def write_inputs(data_dir: Path, docs: list[str]) -> dict[str, list[str]]:
    """The same documents in every supported format; returns file -> expected documents."""
    data_dir.mkdir(parents=True, exist_ok=True)
    records = [{"text": d, "source": "t"} for d in docs]
    (data_dir / "a.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    )
    (data_dir / "b.json").write_text(json.dumps(records, ensure_ascii=False))
    (data_dir / "sub").mkdir(exist_ok=True)
    (data_dir / "sub" / "c.json").write_text("\n".join(json.dumps(r) for r in records))
    pq.write_table(pa.table({"text": docs}), data_dir / "d.parquet", row_group_size=2)
    (data_dir / "e.txt").write_text("\n\n".join(d.replace("\n\n", "\n") for d in docs) + "\n")
    old = {"title": "Title", "desc": "", "content": "Body text"}  # original llm-zero2all layout
    (data_dir / "f.jsonl").write_text(json.dumps(old) + "\n")
    expected = {name: docs for name in ("a.jsonl", "b.json", "sub/c.json", "d.parquet")}
    expected["e.txt"] = [d.rstrip("\n") for d in docs]  # a paragraph's trailing newline is not kept
    expected["f.jsonl"] = ["Title\nBody text"]
    return expected


def decode_docs(bin_path: Path, add_bos: bool = False) -> list[np.ndarray]:
    """Split a .bin at EOS (checking the framing) into per-document id arrays."""
    ids = np.asarray(open_tokens(bin_path))
    assert len(ids) == 0 or ids[-1] == EOS_ID
    cuts = np.flatnonzero(ids == EOS_ID)
    docs = np.split(ids, cuts + 1)[:-1]
    out = []
    for d in docs:
        assert d[-1] == EOS_ID
        d = d[:-1]
        if add_bos:
            assert d[0] == BOS_ID
            d = d[1:]
        out.append(d)
    return out


@pytest.mark.parametrize("num_workers", [1, 2])
def test_round_trip_every_format(tmp_path, tokenizer_dir, tok, num_workers):
    expected = write_inputs(tmp_path / "raw", DOCS)
    out = tmp_path / "tok"
    summary = pretokenize(
        tmp_path / "raw", tokenizer_dir, out, num_workers=num_workers, chunk_mb=1e-4
    )
    assert summary.files_written == len(expected)
    for name, docs in expected.items():
        got = decode_docs(out / (name + ".bin"))
        assert [d.tolist() for d in got] == [encode_untrusted(tok, d) for d in docs], name
        assert [tok.decode(d.tolist()) for d in got] == docs
        meta = read_meta(out / (name + ".bin"))
        assert meta.num_documents == len(docs) and meta.source["path"] == name
        assert meta.dtype == "uint16" and meta.vocab_size == len(tok)


def test_parallel_chunks_are_byte_identical(tmp_path, tokenizer_dir):
    docs = [f"document {i}: " + "some words here " * (i % 7) for i in range(300)]
    write_inputs(tmp_path / "raw", docs)
    pretokenize(tmp_path / "raw", tokenizer_dir, tmp_path / "one", num_workers=1)
    pretokenize(tmp_path / "raw", tokenizer_dir, tmp_path / "two", num_workers=2, chunk_mb=0.002)
    for bin1 in (tmp_path / "one").rglob("*.bin"):
        bin2 = tmp_path / "two" / bin1.relative_to(tmp_path / "one")
        assert bin1.read_bytes() == bin2.read_bytes()
        assert read_meta(bin1).num_documents == read_meta(bin2).num_documents
    assert not list((tmp_path / "two").rglob("*.tmp"))


def test_add_bos(tmp_path, tokenizer_dir, tok):
    write_inputs(tmp_path / "raw", DOCS)
    pretokenize(tmp_path / "raw", tokenizer_dir, tmp_path / "tok", add_bos=True)
    got = decode_docs(tmp_path / "tok" / "a.jsonl.bin", add_bos=True)
    assert [d.tolist() for d in got] == [encode_untrusted(tok, d) for d in DOCS]


def test_uint32_for_large_vocab(tok):
    config = EncoderConfig(tok.backend_tokenizer.to_str(), 70_000, EOS_ID, None, None)
    ids = DocumentEncoder(config).encode(["hi", "there"])
    assert ids.dtype == np.uint32 and ids.tolist().count(EOS_ID) == 2


def test_bad_records_are_skipped_and_counted(tmp_path, tokenizer_dir, tok):
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b'{"text": "unterminated',
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": "   "}).encode(),
        b'{"text": "bad \xff\xfe utf8"}',
        b'{"text": "' + b"x" * (5 * 2**20),  # a 5 MB line that is not valid JSON
        json.dumps({"text": "good two"}).encode(),
    ]
    (raw / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    summary = pretokenize(raw, tokenizer_dir, tmp_path / "tok")
    assert summary.stats.docs == 2
    meta = read_meta(tmp_path / "tok" / "bad.jsonl.bin")
    assert meta.skipped == {"bad_field": 1, "bad_json": 2, "bad_utf8": 1, "empty": 1}
    got = decode_docs(tmp_path / "tok" / "bad.jsonl.bin")
    assert [tok.decode(d.tolist()) for d in got] == ["good one", "good two"]


def output_mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_up_to_date_outputs_are_skipped(tmp_path, tokenizer_dir):
    write_inputs(tmp_path / "raw", DOCS)
    out = tmp_path / "tok"
    pretokenize(tmp_path / "raw", tokenizer_dir, out)
    before = output_mtimes(out)
    again = pretokenize(tmp_path / "raw", tokenizer_dir, out)
    assert (again.files_written, again.files_skipped) == (0, 6)
    assert output_mtimes(out) == before
    os.utime(tmp_path / "raw" / "b.json", ns=(1, 1))  # source changed -> only it is redone
    assert pretokenize(tmp_path / "raw", tokenizer_dir, out).files_written == 1
    assert pretokenize(tmp_path / "raw", tokenizer_dir, out, add_bos=True).files_written == 6
    assert (
        pretokenize(
            tmp_path / "raw", tokenizer_dir, out, add_bos=True, overwrite=True
        ).files_written
        == 6
    )


def test_interrupted_write_is_redone(tmp_path, tokenizer_dir):
    write_inputs(tmp_path / "raw", DOCS)
    out = tmp_path / "tok"
    pretokenize(tmp_path / "raw", tokenizer_dir, out)
    good = (out / "d.parquet.bin").read_bytes()
    # Killed after the .bin rename, before the sidecar: no completion marker.
    meta_path(out / "d.parquet.bin").unlink()
    # Killed while writing: a half-written scratch file and a truncated stale .bin.
    scratch_path(out / "a.jsonl.bin").write_bytes(b"\x01\x02\x03")
    (out / "a.jsonl.bin").write_bytes((out / "a.jsonl.bin").read_bytes()[:-4])
    before = output_mtimes(out)
    summary = pretokenize(tmp_path / "raw", tokenizer_dir, out)
    assert summary.files_written == 2
    after = output_mtimes(out)
    redone = {n for n in after if after[n] != before.get(n)}
    assert redone == {"d.parquet.bin", "d.parquet.bin.meta", "a.jsonl.bin", "a.jsonl.bin.meta"}
    assert (out / "d.parquet.bin").read_bytes() == good
    assert not list(out.rglob("*.tmp"))


def test_killed_run_resumes(tmp_path, tokenizer_dir):
    """A real SIGKILL mid-run; the re-run redoes only what had not finished."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(6):
        docs = [f"file {i} doc {j} " + "lorem ipsum dolor sit amet " * 25 for j in range(400)]
        (raw / f"part{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "tok"
    cmd = [
        sys.executable,
        "-m",
        "data_preprocess.pretokenize_pretrain_data",
        f"--data_dir={raw}",
        f"--tokenizer_dir={tokenizer_dir}",
        f"--out_dir={out}",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while (
        not meta_path(out / "part0.jsonl.bin").exists()
        and time.time() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name for p in out.glob("*.meta")}
    assert "part0.jsonl.bin.meta" in finished and len(finished) < 6  # killed mid-run
    mtimes = {n: (out / n).stat().st_mtime_ns for n in finished}
    summary = pretokenize(raw, tokenizer_dir, out)
    assert summary.files_written == 6 - len(finished)
    assert all((out / n).stat().st_mtime_ns == t for n, t in mtimes.items())
    pretokenize(raw, tokenizer_dir, tmp_path / "ref")
    for i in range(6):
        name = f"part{i}.jsonl.bin"
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert not list(out.glob("*.tmp"))


def test_worker_exception_propagates_and_leaves_no_partial_output(tmp_path, tokenizer_dir):
    write_inputs(tmp_path / "raw", DOCS)
    (tmp_path / "raw" / "broken.json").write_text('[{"text": "ok"}, {"text": "cut off')
    out = tmp_path / "tok"
    with pytest.raises(DataError, match="broken.json: malformed JSON array"):
        pretokenize(tmp_path / "raw", tokenizer_dir, out, num_workers=2)
    assert not (out / "broken.json.bin").exists()
    assert not list(out.rglob("*.tmp"))


def test_tokenizer_mismatch(tmp_path, tokenizer_dir):
    write_inputs(tmp_path / "raw", DOCS[:2])
    out = tmp_path / "tok"
    pretokenize(tmp_path / "raw", tokenizer_dir, out)
    other = tmp_path / "other_tok"
    shutil.copytree(tokenizer_dir, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = [t for t, i in vocab.items() if i in (300, 301)]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # a different id mapping
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match="a.jsonl.bin: was tokenized with a different tokenizer"):
        pretokenize(tmp_path / "raw", other, out)
    assert pretokenize(tmp_path / "raw", other, out, overwrite=True).files_written == 6


def test_cli_errors(tmp_path, tokenizer_dir):
    cmd = [
        sys.executable,
        "-m",
        "data_preprocess.pretokenize_pretrain_data",
        f"--data_dir={tmp_path / 'missing'}",
        f"--tokenizer_dir={tokenizer_dir}",
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 1 and "missing" in res.stderr and "Traceback" not in res.stderr
    with pytest.raises(DataError, match="no .txt/.jsonl/.json/.parquet files"):
        pretokenize(tmp_path, tokenizer_dir, tmp_path / "out")
    write_inputs(tmp_path / "raw", DOCS[:1])
    with pytest.raises(DataError, match="tokenizer directory"):
        pretokenize(tmp_path / "raw", tmp_path / "no_tokenizer", tmp_path / "out")


def test_default_out_dir_is_a_sibling(tmp_path):
    assert default_out_dir(tmp_path / "corpus") == (tmp_path / "corpus_tokens").resolve()


def test_chunk_size_balances_workers():
    mb = 2**20
    assert chunk_size(1000 * mb, 2, 64 * mb) == 64 * mb  # capped by --chunk_mb
    assert chunk_size(50 * mb, 2, 64 * mb) == 50 * mb // 8  # ~4 chunks per worker
    assert chunk_size(2 * mb, 2, 64 * mb) == mb  # never below 1 MB
    assert chunk_size(2 * mb, 2, 1000) == 1000  # unless --chunk_mb asks for less


def write_jsonl(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


def bins(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*.bin")}


def test_stale_outputs_are_removed(tmp_path, tokenizer_dir, tok, caplog):
    """Outputs of renamed/deleted inputs go; another data dir's outputs in out_dir stay."""
    raw, other, out = tmp_path / "raw", tmp_path / "other", tmp_path / "tok"
    docs = {name: [f"{name} document {i} about debian" for i in range(5)] for name in "abcdx"}
    for name in "abcd":
        write_jsonl(raw / ("sub" if name == "c" else "") / f"{name}.jsonl", docs[name])
    write_jsonl(other / "x.jsonl", docs["x"])
    pretokenize(raw, tokenizer_dir, out)
    pretokenize(other, tokenizer_dir, out)  # shares out_dir on purpose
    (out / "junk.bin").write_bytes(b"\0\0")  # no sidecar: not ours, never touched
    (raw / "b.jsonl").rename(raw / "b2.jsonl")
    (raw / "sub" / "c.jsonl").rename(raw / "sub" / "c.jsonl.old")  # exists, no longer an input
    (raw / "d.jsonl").unlink()
    with caplog.at_level("INFO"):
        summary = pretokenize(raw, tokenizer_dir, out)
    assert (summary.files_written, summary.files_removed) == (1, 3)
    assert bins(out) == {"a.jsonl.bin", "b2.jsonl.bin", "x.jsonl.bin", "junk.bin"}
    assert {p.name for p in out.rglob("*.meta")} == {
        "a.jsonl.bin.meta",
        "b2.jsonl.bin.meta",
        "x.jsonl.bin.meta",
    }
    removed_lines = [r.getMessage() for r in caplog.records if "removed stale" in r.getMessage()]
    assert len(removed_lines) == 3
    for name in ("b.jsonl", "sub/c.jsonl", "d.jsonl"):
        assert sum(str(out / (name + ".bin")) in line for line in removed_lines) == 1
    (out / "junk.bin").unlink()
    # The index holds each current document exactly once (EOS after each).
    build_index(out, 4)
    want = sum(len(encode_untrusted(tok, d)) + 1 for n in "abx" for d in docs[n])
    assert read_index(out, 4).header["num_tokens"] == want


def test_moved_corpus_and_old_sidecars_stay_tracked(tmp_path, tokenizer_dir):
    """A moved data dir stays up to date, and its outputs (and those of sidecars written before
    the data dir was recorded) are still removed when their source goes."""
    raw, out = tmp_path / "raw", tmp_path / "tok"
    for name in "abc":
        write_jsonl(raw / f"{name}.jsonl", [f"{name} text"])
    pretokenize(raw, tokenizer_dir, out)
    legacy = json.loads(meta_path(out / "c.jsonl.bin").read_text())
    del legacy["source"]["data_dir"]
    meta_path(out / "c.jsonl.bin").write_text(json.dumps(legacy))
    raw.rename(tmp_path / "moved")
    moved = tmp_path / "moved"
    summary = pretokenize(moved, tokenizer_dir, out)
    assert (summary.files_written, summary.files_skipped, summary.files_removed) == (0, 3, 0)
    (moved / "a.jsonl").unlink()
    (moved / "c.jsonl").unlink()
    assert pretokenize(moved, tokenizer_dir, out).files_removed == 2
    assert bins(out) == {"b.jsonl.bin"}


@pytest.mark.parametrize(
    "args,option",
    [
        (["--num_workers=2", "--chunk_mb=0"], "--chunk_mb"),
        (["--num_workers=2", "--chunk_mb=-3"], "--chunk_mb"),
        (["--chunk_mb=nan"], "--chunk_mb"),
        (["--num_workers=0"], "--num_workers"),
    ],
)
def test_cli_rejects_bad_numbers(tmp_path, tokenizer_dir, capsys, args, option):
    write_jsonl(tmp_path / "raw" / "a.jsonl", ["some text"])
    out = tmp_path / "out"
    argv = [f"--data_dir={tmp_path / 'raw'}", f"--tokenizer_dir={tokenizer_dir}"]
    argv.append(f"--out_dir={out}")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv + args))
    err = capsys.readouterr().err
    assert exit_info.value.code != 0
    assert err.startswith("error: ") and option in err and "Traceback" not in err
    assert not out.exists()  # rejected before any work
