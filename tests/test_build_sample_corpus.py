"""data/build_sample_corpus.py: cleaning units, the held-out split, and the committed corpus."""

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from data.build_sample_corpus import (
    PACKAGES,
    SOURCES,
    build,
    clean_fortune,
    cjk_share,
    html_to_sections,
    package_version,
    split_fortunes,
    split_heldout,
    write_records,
)
from data.readers import ReadStats, iter_documents, list_data_files
from utils.errors import DataError

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"


# ---------------------------------------------------------------------------------- fortunes


def test_split_fortunes_and_clean() -> None:
    raw = (
        "first cookie\n\t\t-- Someone   \n%\n%\n"
        "\x1b[32m《静夜思》\x1b[m\n\x1b[33m作者：李白\x1b[m\n床前明月光\n%\n"
        "b\x08bold and _\x08u_\x08n_\x08d\x07er\n%\n\n"
    )
    assert list(split_fortunes(raw)) == [
        "first cookie\n\t\t-- Someone",
        "《静夜思》\n作者：李白\n床前明月光",
        "bold and under",
    ]


def test_clean_fortune_removes_c1_controls_keeps_tabs() -> None:
    assert clean_fortune("a\x80b\x9d\tc\x1b[1;31md") == "ab\tcd"


# ---------------------------------------------------------------------------------- handbook HTML

PAGE = """<?xml version="1.0" encoding="UTF-8"?>
<html xmlns="http://www.w3.org/1999/xhtml"><head><title>5.1. Structure</title></head><body>
<div id="banner"><a href="x"><span class="text">Download the ebook</span></a></div>
<p id="title"><a class="left" href="y"><img alt="Product Site" src="i.png" /></a></p>
<ul class="docnav top"><li class="previous"><a href="p.html"><strong>Prev</strong></a></li></ul>
<div class="section"><div class="titlepage"><h2 class="title"><a id="s"></a>5.1. Structure
 of a <code>Package</code></h2></div>
<a id="id-1" class="indexterm"></a>
<div class="toc"><dl><dt>5.1.1. Sub</dt></dl></div>
<div class="para">A Debian   package is
 an <em>archive</em> &amp; more.</div>
<pre class="screen">$ ls
  a   b</pre>
<div class="section"><h3 class="title">5.1.1. Sub</h3>
<div class="para">Sub text<br/>next.</div>
<table><tr><td>cell1</td><td>cell2</td></tr></table>
</div></div>
<ul class="docnav"><li class="next"><a href="n.html"><strong>Next</strong></a></li></ul>
</body></html>"""


def test_html_to_sections_drops_chrome_and_splits_at_headings() -> None:
    assert html_to_sections(PAGE, "en") == [
        "5.1. Structure of a Package\n\nA Debian package is an archive & more.\n\n$ ls\n  a   b",
        "5.1.1. Sub\n\nSub text next.\n\ncell1 cell2",
    ]


def test_html_to_sections_zh_drops_untranslated_paragraphs() -> None:
    page = ("<html><body><h2>第 5 章 软件包</h2>"
            "<div class='para'>This paragraph was never translated into Chinese at all.</div>"
            "<div class='para'>这是已经翻译的段落，包含 dpkg 命令。</div>"
            "<h2>Untranslated</h2><div class='para'>Only English text in this whole section.</div>"
            "</body></html>")
    assert html_to_sections(page, "zh") == ["第 5 章 软件包\n\n这是已经翻译的段落，包含 dpkg 命令。"]
    assert len(html_to_sections(page, "en")) == 2


def test_cjk_share() -> None:
    assert cjk_share("中文ab") == 0.5
    assert cjk_share("123 !") == 0.0


# ---------------------------------------------------------------------------------- split and write


def test_split_heldout_is_deterministic_two_percent_and_ordered() -> None:
    docs = [f"doc {i}" for i in range(1000)]
    pretrain, heldout = split_heldout(docs, "src", seed=1)
    assert len(heldout) == 20 and len(pretrain) == 980
    assert set(pretrain).isdisjoint(heldout) and set(pretrain) | set(heldout) == set(docs)
    assert pretrain == sorted(pretrain, key=docs.index)
    assert heldout == sorted(heldout, key=docs.index)
    assert split_heldout(docs, "src", seed=1) == (pretrain, heldout)
    assert split_heldout(docs, "src", seed=2)[1] != heldout
    assert split_heldout(["only"], "src", seed=1) == ([], ["only"])  # at least one held out


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_write_records_round_trip_and_deterministic(tmp_path: Path, suffix: str) -> None:
    records = [{"text": f"文本 {i}\nline", "source": "s", "lang": "zh"} for i in range(1200)]
    a, b = tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"
    write_records(a, records)
    write_records(b, records)
    assert a.read_bytes() == b.read_bytes()
    assert list(iter_documents(a)) == [r["text"] for r in records]


def test_missing_package_is_clear_error() -> None:
    with pytest.raises(DataError, match="zero2all-no-such-package.*apt-get install"):
        package_version("zero2all-no-such-package")


# ------------------------------------------------------------------------------ committed corpus


def _records(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines()]


def test_committed_sample_corpus_layout() -> None:
    files = list_data_files(SAMPLE)
    assert sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file()) <= 10 * 1024 * 1024
    names = {f"{s.name}{s.suffix}" for s in SOURCES}
    for split in ("pretrain", "heldout"):
        assert {p.name for p in files if p.parent.name == split} == names
    assert {p.suffix for p in files} == {".jsonl", ".json", ".parquet"}
    docs_by = Counter()
    bytes_by = Counter()
    for source in SOURCES:
        split_texts = {}
        for split in ("pretrain", "heldout"):
            path = SAMPLE / split / f"{source.name}{source.suffix}"
            records = _records(path)
            assert all(set(r) == {"text", "source", "lang"} for r in records), path
            assert all(r["source"] == source.name and r["lang"] == source.lang for r in records)
            split_texts[split] = [r["text"] for r in records]
            stats = ReadStats()
            assert list(iter_documents(path, stats=stats)) == split_texts[split]
            assert stats.num_skipped == 0
        pre, held = split_texts["pretrain"], split_texts["heldout"]
        assert set(pre).isdisjoint(held) and len(set(pre)) == len(pre)
        assert len(held) == max(1, round(0.02 * (len(pre) + len(held)))), source.name
        docs_by[source.lang] += len(pre) + len(held)
        bytes_by[source.lang] += sum(len(t.encode("utf-8")) for t in pre + held)
        assert not any("\x1b" in t or "\x08" in t for t in pre + held)
    assert bytes_by["en"] > 2_000_000 and bytes_by["zh"] > 2_000_000
    assert docs_by["en"] > 10_000 and docs_by["zh"] > 5_000
    assert (SAMPLE / "PROVENANCE.md").is_file()


def _packages_installed() -> bool:
    try:
        for package in PACKAGES:
            package_version(package)
    except DataError:
        return False
    return True


@pytest.mark.skipif(not _packages_installed(), reason="Debian source packages not installed")
def test_rebuild_matches_committed_bytes(tmp_path: Path) -> None:
    build(tmp_path, seed=1234)
    built = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(SAMPLE) for p in list_data_files(SAMPLE))
    assert built == committed
    for rel in built:
        assert (tmp_path / rel).read_bytes() == (SAMPLE / rel).read_bytes(), rel
    shutil.rmtree(tmp_path)
