"""data/extract_wikipedia.py on a small MediaWiki dump built here (.xml and .xml.bz2)."""

import bz2
import json
import subprocess
import sys
from pathlib import Path

import pytest

from data.extract_wikipedia import (
    ExtractStats,
    clean_wikitext,
    extract,
    iter_articles,
    remove_balanced,
    remove_tables,
)
from utils.errors import DataError

ROOT = Path(__file__).resolve().parent.parent

ARTICLE_WIKITEXT = """{{Infobox city
| name = Exampleton
| population = {{formatnum:{{#expr: 1000 * 2}}}}
| image = {{Image|{{nested|deep}}}}
}}
'''Exampleton''' is a ''small'' [[town]] in [[Examplia|the Republic of Examplia]].<ref name="a">{{cite web|url=http://x.example|title=Source}}</ref> It was founded in 1850.<ref name="b" />
<!-- a hidden editor comment -->
[[File:Exampleton.jpg|thumb|The [[town hall]] at night]]

== History ==
The town grew around a [[railway]] station.<ref>Smith, ''History'', p. 3.</ref>

{| class="wikitable"
|-
! Year !! Population
|-
| 1900 || 500
{|
| nested table cell
|}
|}

=== Modern era ===
* Tourism &amp; trade
* See [http://example.org the official site] and [http://example.org/bare].
Water boils at 100&nbsp;°C.<br/>New line.

[[Category:Towns]]
[[Category:Examplia]]
"""

EXPECTED_TEXT = """Exampleton is a small town in the Republic of Examplia. It was founded in 1850.

History
The town grew around a railway station.

Modern era
Tourism & trade
See the official site and .
Water boils at 100\u00a0°C.
New line."""

NS = "http://www.mediawiki.org/xml/export-0.10/"


def _page(title: str, ns: int, text: str, redirect: str | None = None) -> str:
    redirect_elem = f'<redirect title="{redirect}" />' if redirect else ""
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return (
        f"<page><title>{title}</title><ns>{ns}</ns><id>{abs(hash(title)) % 1000}</id>"
        f"{redirect_elem}<revision><id>1</id><text bytes=\"{len(text)}\" "
        f'xml:space="preserve">{escaped}</text></revision></page>'
    )


def build_dump() -> str:
    pages = [
        _page("Exampleton", 0, ARTICLE_WIKITEXT),
        _page("Talk:Exampleton", 1, "Is this [[town]] real?"),
        _page("Template:Infobox city", 10, "{{{name}}} infobox"),
        _page("Exampletown", 0, "#REDIRECT [[Exampleton]]", redirect="Exampleton"),
        _page("Old name", 0, "#redirect [[Exampleton]]"),
        _page("Stub", 0, "{{stub}}"),
        _page("北京", 0, "'''北京'''是[[中华人民共和国]]的[[首都]]。<ref>来源</ref>"),
    ]
    return (
        f'<mediawiki xmlns="{NS}" version="0.10" xml:lang="en">'
        "<siteinfo><sitename>Test</sitename></siteinfo>" + "".join(pages) + "</mediawiki>"
    )


@pytest.fixture(params=[".xml", ".xml.bz2"])
def dump_path(request, tmp_path: Path) -> Path:
    data = build_dump().encode("utf-8")
    path = tmp_path / f"dump{request.param}"
    path.write_bytes(bz2.compress(data) if request.param.endswith(".bz2") else data)
    return path


def test_extract_dump(dump_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "wiki.jsonl"
    stats = extract(dump_path, out)
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["title"] for r in records] == ["Exampleton", "北京"]
    assert records[0]["text"] == EXPECTED_TEXT
    assert records[1]["text"] == "北京是中华人民共和国的首都。"
    assert stats == ExtractStats(pages=7, articles=2, redirects=2, other_namespace=2, empty=1)
    assert not list(out.parent.glob("*.tmp"))


def test_clean_wikitext_pieces() -> None:
    assert clean_wikitext("a<ref>x {{y}}</ref>b<ref name=\"n\"/>c") == "abc"
    assert clean_wikitext("a<ref name=\"p/q\" />b<ref name=q>z</ref>c") == "abc"
    assert clean_wikitext("[[link]] and [[target|label]]") == "link and label"
    assert clean_wikitext("x[[Image:a.png|thumb|cap [[in]] [[side|s]]]]y") == "xy"
    assert clean_wikitext("x [[category:Lower]] y") == "x  y"
    assert clean_wikitext("'''''both''''' ''it'' '''b'''") == "both it b"
    assert clean_wikitext("== Head ==\ntext\n==Tight==") == "Head\ntext\nTight"
    assert clean_wikitext("a<!-- c\nd -->b") == "ab"
    assert clean_wikitext("<div class=\"x\">in <span>side</span></div>") == "in side"
    assert clean_wikitext("E = <math>mc^2</math> holds") == "E =  holds"
    assert clean_wikitext("__NOTOC__\nText") == "Text"


def test_remove_balanced_nesting_and_typos() -> None:
    assert remove_balanced("a{{b{{c}}d}}e{{f}}g", "{{", "}}") == "aeg"
    assert remove_balanced("a}}b", "{{", "}}") == "a}}b"  # stray close kept
    assert remove_balanced("keep {{unclosed and rest", "{{", "}}") == "keep {{unclosed and rest"


def test_remove_tables_nested() -> None:
    text = "before\n{|\n| a\n{|\n| b\n|}\n| c\n|}\nafter"
    assert remove_tables(text) == "before\nafter"


def test_iter_articles_is_streaming(tmp_path: Path) -> None:
    """Pages are yielded one at a time (a generator), before the whole dump is consumed."""
    path = tmp_path / "dump.xml"
    path.write_text(build_dump(), encoding="utf-8")
    stats = ExtractStats()
    gen = iter_articles(path, stats)
    title, _ = next(gen)
    assert title == "Exampleton" and stats.pages == 1


def test_malformed_dump_is_data_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.xml"
    path.write_text(build_dump()[:-30], encoding="utf-8")
    with pytest.raises(DataError, match="bad.xml: malformed XML"):
        list(iter_articles(path, ExtractStats()))


def test_cli_missing_input(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "data.extract_wikipedia", f"--input={tmp_path / 'nope.xml.bz2'}",
         f"--output={tmp_path / 'out.jsonl'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert "error: input dump" in proc.stderr and "nope.xml.bz2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out.jsonl").exists()
