"""data/readers.py: every format, bad records counted, byte-range splits equal whole reads."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.readers import ReadStats, extract_text, iter_documents, list_data_files, split_ranges
from utils.errors import DataError

DOCS = [
    "first document",
    "中文文档，含标点。",
    "multi\nline\n\nwith blank line",
    "emoji 👩‍👩‍👧 and tab\there",
    " leading and trailing spaces ",
]


def _read(path: Path, **kwargs) -> tuple[list[str], ReadStats]:
    stats = ReadStats()
    return list(iter_documents(path, stats=stats, **kwargs)), stats


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    return path


def _write_parquet(path: Path, records: list[dict], row_group_size: int = 2) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return path


# ---------------------------------------------------------------------------------- formats


def test_jsonl(tmp_path: Path) -> None:
    docs, stats = _read(_write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in DOCS]))
    assert docs == DOCS
    assert stats.docs == len(DOCS) and stats.num_skipped == 0
    assert stats.bytes == sum(len(d.encode("utf-8")) for d in DOCS)


def test_json_array_and_json_lines(tmp_path: Path) -> None:
    array = tmp_path / "array.json"
    array.write_text("  \n" + json.dumps([{"text": d} for d in DOCS], ensure_ascii=False), "utf-8")
    assert _read(array)[0] == DOCS
    lines = _write_jsonl(tmp_path / "lines.json", [{"text": d} for d in DOCS])
    assert _read(lines)[0] == DOCS


def test_parquet(tmp_path: Path) -> None:
    path = _write_parquet(tmp_path / "a.parquet", [{"text": d, "n": i} for i, d in enumerate(DOCS)])
    assert _read(path)[0] == DOCS


def test_txt_paragraphs(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"\n\npara one\nline two\n\n\n  \npara two\r\n\r\npara three")
    assert _read(path)[0] == ["para one\nline two", "para two", "para three"]


def test_text_field_choice(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "a.jsonl", [
        {"text": "t", "content": "c"},
        {"content": "only content"},
        {"title": "T", "desc": "", "content": "C"},  # original llm-zero2all layout
        {"body": "b"},
    ])
    docs, stats = _read(path)
    assert docs == ["t", "only content", "T\nC"]
    assert stats.skipped == {"bad_field": 1}
    assert _read(path, text_field="body")[0] == ["b"]
    assert extract_text({"title": "T", "desc": 3, "content": "C"}, None) is None


def test_parquet_text_field_and_missing_column(tmp_path: Path) -> None:
    path = _write_parquet(tmp_path / "a.parquet", [{"body": "x"}, {"body": "y"}])
    assert _read(path, text_field="body")[0] == ["x", "y"]
    with pytest.raises(DataError, match=r"a\.parquet: no column"):
        _read(path)


# ---------------------------------------------------------------------------------- bad records


def test_bad_records_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"text": "good one"}\n'
        b'{"text": broken json\n'
        b'["not", "an", "object"]\n'
        b'{"text": 42}\n'
        b'{"other": "x"}\n'
        b'{"text": "   "}\n'
        b'{"text": "bad \xff utf8"}\n'
        b'{"text": "lone \\ud800 surrogate"}\n'  # valid JSON, but not encodable as UTF-8
        b"\n"
        b'{"text": "good two"}'  # no final newline
    )
    docs, stats = _read(path)
    assert docs == ["good one", "good two"]
    assert stats.skipped == {"bad_json": 1, "not_object": 1, "bad_field": 2, "empty": 1,
                             "bad_utf8": 2}
    assert "2 documents read, 7 records skipped" in stats.summary()


def test_jsonl_with_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    docs, stats = _read(path)
    assert docs == ["first", "second"] and not stats.skipped


def test_txt_bad_utf8_and_parquet_nulls(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_bytes(b"ok\n\nbad \xff\n\nok too\n")
    docs, stats = _read(txt)
    assert docs == ["ok", "ok too"] and stats.skipped == {"bad_utf8": 1}
    pqt = _write_parquet(tmp_path / "a.parquet", [{"text": "a"}, {"text": None}, {"text": ""}])
    docs, stats = _read(pqt)
    assert docs == ["a"] and stats.skipped == {"bad_field": 1, "empty": 1}


def test_json_array_non_objects_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text('[{"text": "a"}, 3, {"text": "b"}, {"no": 1}]', "utf-8")
    docs, stats = _read(path)
    assert docs == ["a", "b"] and stats.skipped == {"not_object": 1, "bad_field": 1}
    path.write_text('[{"text": "a"}, {"text": "b"', "utf-8")
    with pytest.raises(DataError, match=r"a\.json: malformed JSON array after 1 documents"):
        _read(path)


def test_stats_merge() -> None:
    a, b = ReadStats(docs=2, bytes=10), ReadStats(docs=1, bytes=5)
    a.skip("bad_json")
    b.skip("bad_json")
    b.skip("empty")
    a.merge(b)
    assert (a.docs, a.bytes, a.skipped) == (3, 15, {"bad_json": 2, "empty": 1})


# ------------------------------------------------------------------------------ files and errors


def test_list_data_files(tmp_path: Path) -> None:
    for name in ["b.jsonl", "a/c.parquet", "a/d.TXT", "e.csv", "f.json"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_data_files(tmp_path)] == [
        "a/c.parquet", "a/d.TXT", "b.jsonl", "f.json"]
    with pytest.raises(DataError, match="missing"):
        list_data_files(tmp_path / "missing")


def test_unsupported_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        _read(tmp_path / "x.csv")
    with pytest.raises(DataError, match=r"nope\.jsonl: cannot read file"):
        _read(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable parquet file"):
        _read(bad)


# ---------------------------------------------------------------------------------- byte ranges


def _read_ranges(path: Path, ranges: list[tuple[int, int]]) -> tuple[list[str], ReadStats]:
    stats = ReadStats()
    docs = [d for r in ranges for d in iter_documents(path, stats=stats, byte_range=r)]
    return docs, stats


def _assert_every_two_way_split(path: Path) -> None:
    """Cutting the file at every byte offset gives exactly the whole-file documents."""
    whole, whole_stats = _read(path)
    size = path.stat().st_size
    for cut in range(size + 1):
        docs, stats = _read_ranges(path, [(0, cut), (cut, size)])
        assert docs == whole, f"cut at byte {cut}"
        assert stats.skipped == whole_stats.skipped, f"cut at byte {cut}"


def test_jsonl_every_byte_split(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(
        "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCS).encode()
        + b"\n{bad json}\n" + b'{"text": "last, no newline"}'
    )
    _assert_every_two_way_split(path)


def test_txt_every_byte_split(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(
        "\n\nfirst para\nsecond line\n\n\n   \nnext 中文 para\r\n\r\n"
        "x\n\ny\n\n\n\nlast\nno newline".encode("utf-8")
    )
    _assert_every_two_way_split(path)


def test_txt_split_with_non_ascii_whitespace_bytes(tmp_path: Path) -> None:
    """Lines made of bytes that chr() calls spaces (0x85, 0xa0) but bytes.strip() does not."""
    path = tmp_path / "a.txt"
    path.write_bytes(b"one\n\xa0\ntwo\n\n\x85\nthree\n")
    _assert_every_two_way_split(path)


def test_txt_split_long_lines(tmp_path: Path) -> None:
    """Blank-line look-back across 4 KiB blocks: long whitespace runs and long lines."""
    path = tmp_path / "a.txt"
    path.write_bytes(b"p1\n" + b" " * 9000 + b"\nx" + b"y" * 5000 + b"\n\n" + b" " * 5000
                     + b"z\nw\n\nend\n")
    whole = _read(path)[0]
    assert whole == ["p1", "x" + "y" * 5000, " " * 5000 + "z\nw", "end"]
    size = path.stat().st_size
    for cut in list(range(0, size + 1, 97)) + [9003, 9004, 9005, 14008, 14009, 19010, 19011]:
        assert _read_ranges(path, [(0, cut), (cut, size)])[0] == whole, f"cut at byte {cut}"


@pytest.mark.parametrize("suffix", [".jsonl", ".txt", ".json"])
def test_split_ranges_cover_file_in_order(tmp_path: Path, suffix: str) -> None:
    texts = [f"document number {i} " + "word " * (i % 7) for i in range(200)]
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".txt":
        path.write_text("\n\n".join(texts) + "\n", "utf-8")
    else:
        _write_jsonl(path, [{"text": t} for t in texts])
    whole = _read(path)[0]
    assert [t.strip() for t in whole] == [t.strip() for t in texts]
    for num_chunks in (1, 2, 3, 7, 64, 10_000):
        ranges = split_ranges(path, num_chunks)
        assert ranges[0][0] == 0 and ranges[-1][1] == path.stat().st_size
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert _read_ranges(path, ranges)[0] == whole


def test_split_ranges_parquet_row_groups(tmp_path: Path) -> None:
    texts = [f"row {i}" for i in range(23)]
    path = _write_parquet(tmp_path / "a.parquet", [{"text": t} for t in texts], row_group_size=4)
    assert pq.ParquetFile(path).metadata.num_row_groups == 6
    for num_chunks in (1, 2, 4, 6, 100):
        ranges = split_ranges(path, num_chunks)
        assert ranges[0][0] == 0 and ranges[-1][1] == 6
        assert len(ranges) == min(num_chunks, 6)
        assert _read_ranges(path, ranges)[0] == texts
    assert _read(path, byte_range=(2, 3))[0] == texts[8:12]


def test_split_ranges_json_array_is_one_range(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"text": t} for t in DOCS]), "utf-8")
    assert split_ranges(path, 8) == [(0, path.stat().st_size)]


def test_split_ranges_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    assert split_ranges(path, 4) == []
    assert _read(path)[0] == []
