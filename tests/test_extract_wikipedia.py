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
    remove_tables,
    remove_templates,
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


def test_remove_templates_nesting_and_typos() -> None:
    assert remove_templates("a{{b{{c}}d}}e{{f}}g") == "aeg"
    assert remove_templates("a}}b") == "a}}b"  # stray close kept
    assert remove_templates("keep {{unclosed and rest") == "keep {{unclosed and rest"
    assert remove_templates("a{{b|x { y}}c") == "ac"  # a lone "{" typo does not hold the close


def test_remove_templates_single_braces_in_content() -> None:
    """``{{math|1=e^{i\\pi}}}``: the ``{i\\pi}`` group is template content, so ``}}}`` is
    ``}`` (closing the group) followed by ``}}`` (closing the template)."""
    assert remove_templates("x {{math|1=e^{i\\pi}}} y") == "x  y"
    assert clean_wikitext("x {{math|1=e^{i\\pi}}} y {{math|{{mvar|x}}}} z") == "x  y  z"
    assert remove_templates("a{{t|{{{1}}}}}b{{{p}}}c") == "abc"  # template parameters


def test_dropped_tags_before_templates() -> None:
    """An unbalanced ``{{`` inside <math>/<syntaxhighlight> is not template markup: the templates
    after it are still removed."""
    text = "A <math>\\mathbf{{v}_1}</math> b. {{citation needed}} c. {{Reflist}}"
    assert clean_wikitext(text) == "A  b.  c."
    text = '<syntaxhighlight lang="c">int f() {{ return 1; }</syntaxhighlight>x {{y}} z'
    assert clean_wikitext(text) == "x  z"


def test_nowiki_and_pre_are_literal() -> None:
    """Markup inside <nowiki>/<pre> is shown as typed, and never opens a template or link."""
    text = "Write <nowiki>{{cite}} and [[link]]</nowiki> here. {{citation needed}} Done."
    assert clean_wikitext(text) == "Write {{cite}} and [[link]] here.  Done."
    assert clean_wikitext("<pre>a {{ b</pre>\n{{stub}}after") == "a {{ b\nafter"
    assert clean_wikitext("[[dog]]<nowiki/>s and ''<nowiki>''</nowiki>''") == "dogs and ''"


def test_indented_tables_removed() -> None:
    text = 'intro\n:{| class="wikitable"\n| CELL\n|}\nafter\n* {|\n| c2\n:{|\n| c3\n|}\n|}\nend'
    assert remove_tables(text) == "intro\nafter\nend"
    assert clean_wikitext(text) == "intro\nafter\nend"


def test_external_link_inside_links() -> None:
    """A file link goes whole even with an external link in its caption; a label may hold one."""
    assert clean_wikitext("A [[File:x.jpg|thumb|see [http://example.com site] here]] B") == "A  B"
    assert clean_wikitext("[[Foo|see [https://example.org the site] now]]") == "see the site now"


def test_language_conversion() -> None:
    """zhwiki ``-{...}-``: the zh-hans variant (else zh-cn, else the first), bare text as is,
    rules that display nothing (H, T, -) dropped, A rules displayed."""
    assert clean_wikitext("-{zh-hans:计算机; zh-hant:電腦;}-是一种设备") == "计算机是一种设备"
    assert clean_wikitext("他是-{A|zh-hans:澳大利亚;zh-hant:澳洲}-人") == "他是澳大利亚人"
    assert clean_wikitext("-{H|zh-hans:计算机; zh-hant:電腦;}-电脑") == "电脑"
    assert clean_wikitext("-{T|zh-hans:标题;zh-hant:標題}-正文") == "正文"
    assert clean_wikitext("a -{Foo}- b") == "a Foo b"
    assert clean_wikitext("-{zh-tw:網路;zh-cn:网络}-") == "网络"
    assert clean_wikitext("-{zh-tw:網路; zh-hk:網絡}-") == "網路"
    assert clean_wikitext("-{[[巴黎|巴黎市]]}-") == "巴黎市"
    assert clean_wikitext("-{zh-hans;zh-hant|文字}-") == "文字"


def test_output_directory_is_data_error_before_reading(tmp_path: Path) -> None:
    """The output path is checked first: a malformed dump is never even opened."""
    bad = tmp_path / "bad.xml"
    bad.write_text(build_dump()[:-30], encoding="utf-8")
    out_dir = tmp_path / "outdir"
    out_dir.mkdir()
    with pytest.raises(DataError, match="outdir.*is a directory"):
        extract(bad, out_dir)


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


def test_cli_output_is_directory(dump_path: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "data.extract_wikipedia", f"--input={dump_path}",
         f"--output={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert "error: output" in proc.stderr and str(tmp_path) in proc.stderr
    assert "Traceback" not in proc.stderr
