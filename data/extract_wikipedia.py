"""Stream a MediaWiki XML dump (.xml or .xml.bz2) into ``{"title", "text"}`` JSON lines.

    python -m data.extract_wikipedia --input=DUMP.xml[.bz2] --output=OUT.jsonl

The dump is parsed incrementally with ``xml.etree.ElementTree.iterparse`` and every finished
``<page>`` is cleared, so memory stays flat on a multi-GB dump; ``.bz2`` input is decompressed
on the fly. Only articles are kept: pages with ``<ns>`` other than 0 (talk, user, template,
category, ...) and redirects (a ``<redirect>`` element or text starting with ``#REDIRECT``) are
skipped, as are articles that are empty after cleaning.

:func:`clean_wikitext` turns wiki markup into plain text, in this order:
comments ``<!-- -->``; ``<nowiki>``/``<pre>`` (content kept as literal text, its markup
characters shielded as HTML entities until the end); content-free tags (``<math>``,
``<syntaxhighlight>``, ``<gallery>``, ...), dropped before templates so an unbalanced ``{{`` in a
formula cannot swallow the article's later templates; references ``<ref .../>`` and
``<ref>...</ref>``; templates ``{{...}}`` (nested, incl. infoboxes and ``{{math|e^{x}}}``);
tables ``{| ... |}`` (nested, line based, also when indented as ``:{|`` or ``* {|``);
language-conversion markup ``-{...}-`` (see :func:`replace_language_conversion`); external links
``[http://x label]`` -> label (first, so one inside a file caption goes with the file); links
``[[File:..]]``/``[[Image:..]]``/``[[Category:..]]`` (removed, even with nested links in a
caption), ``[[target|label]]`` -> label, ``[[target]]`` -> target; bold/italic quotes; headings
``== X ==`` -> ``X``; ``<br>`` -> newline; remaining HTML tags (their text kept); HTML entities;
magic words (``__TOC__``); list markers at line starts; runs of blank lines.
"""

from __future__ import annotations

import argparse
import bz2
import html
import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tqdm import tqdm

from utils.errors import DataError, run_cli
from utils.logging_utils import get_logger, setup_logging

logger = get_logger(__name__)

_COMMENT_RE = re.compile(r"<!--.*?(?:-->|\Z)", re.DOTALL)
_REF_SELF_CLOSING_RE = re.compile(r"<ref\b[^>]*/\s*>", re.IGNORECASE)
_REF_RE = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.IGNORECASE | re.DOTALL)
_NOWIKI_EMPTY_RE = re.compile(r"<(?:nowiki|pre)\b[^>]*/\s*>", re.IGNORECASE)
_NOWIKI_RE = re.compile(r"<(nowiki|pre)\b[^>]*>(.*?)</\1\s*>", re.IGNORECASE | re.DOTALL)
_WIKI_MARKUP_CHARS = frozenset("[]{}|'<>=*#:;_")
_DROPPED_TAGS = ("math", "gallery", "timeline", "score", "syntaxhighlight", "source",
                 "imagemap", "references", "chem", "hiero")
_DROPPED_TAG_RE = re.compile(
    r"<(%s)\b[^>]*>.*?</\1\s*>" % "|".join(_DROPPED_TAGS), re.IGNORECASE | re.DOTALL
)
_LANG_CONVERSION_RE = re.compile(r"-\{(.*?)\}-", re.DOTALL)
_LANG_VARIANT = r"[a-z]{2,3}(?:-[a-z]{2,4})*"
_LANG_FLAG = r"(?:[ADHNRT-]|%s)" % _LANG_VARIANT  # a flag letter, or a variant to show in
_LANG_FLAGS_RE = re.compile(r"\s*(%s(?:\s*;\s*%s)*)\s*;?\s*\|(.*)" % (_LANG_FLAG, _LANG_FLAG),
                            re.DOTALL)
_LANG_VARIANT_SPLIT_RE = re.compile(r";(?=\s*%s\s*:)" % _LANG_VARIANT)
_LANG_VARIANT_RE = re.compile(r"\s*(%s)\s*:(.*)" % _LANG_VARIANT, re.DOTALL)
_LANG_PREFERRED_VARIANTS = ("zh-hans", "zh-cn")
_INNER_LINK_RE = re.compile(r"\[\[([^\[\]]*)\]\]")
_DROPPED_LINK_NAMESPACES = ("file", "image", "media", "category")
_EXTERNAL_LINK_RE = re.compile(r"\[(?:https?|ftp)://[^\s\]]+(?:\s+([^\]]*))?\]")
_BOLD_ITALIC_RE = re.compile(r"'{2,}")
_HEADING_RE = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.MULTILINE)
_BR_RE = re.compile(r"<br\s*/?\s*>", re.IGNORECASE)
_TAG_RE = re.compile(r"</?[a-zA-Z][^>]*>")
_MAGIC_WORD_RE = re.compile(r"__[A-Z]+__")
_LIST_MARKER_RE = re.compile(r"^[*#:;]+\s*", re.MULTILINE)
_BLANK_LINES_RE = re.compile(r"\n{3,}")
_REDIRECT_RE = re.compile(r"^\s*#redirect", re.IGNORECASE)


def remove_templates(text: str) -> str:
    """Remove every outermost ``{{ ... }}`` span, honouring nesting.

    Single braces inside a template are content and are counted, so in ``{{math|e^{x}}}`` the
    first ``}`` of ``}}}`` closes ``{x`` and the last two close the template (likewise the
    ``{{{param}}}`` of template code). An open single brace only claims the first ``}`` of a
    ``}}}``, so a lone ``{`` typo inside a template never keeps a plain ``}}`` from closing it.
    A stray ``}}`` is kept as text; an unclosed ``{{`` keeps the rest of the text (so a typo never
    deletes the remainder of an article).
    """
    out: list[str] = []
    depth, single, start, i = 0, 0, 0, 0  # single: open single braces inside the template
    while i < len(text):
        if text.startswith("{{", i):
            if depth == 0:
                out.append(text[start:i])
                start = i
            depth += 1
            i += 2
        elif depth > 0 and single > 0 and text.startswith("}}}", i):
            single -= 1
            i += 1
        elif depth > 0 and text.startswith("}}", i):
            depth -= 1
            i += 2
            if depth == 0:
                start, single = i, 0
        elif depth > 0 and text[i] in "{}":
            single = single + 1 if text[i] == "{" else max(single - 1, 0)
            i += 1
        else:
            i += 1
    out.append(text[start:])
    return "".join(out)


def remove_tables(text: str) -> str:
    """Remove wiki tables: lines from ``{|`` to the matching ``|}`` (nested tables included).

    The marks count after leading whitespace and ``:*#;`` (``:{| class="wikitable"``).
    """
    kept: list[str] = []
    depth = 0
    for line in text.split("\n"):
        stripped = line.lstrip(" \t:*#;")  # a table may sit in an indent or list item
        if stripped.startswith("{|"):
            depth += 1
        elif depth > 0 and stripped.startswith("|}"):
            depth -= 1
        elif depth == 0:
            kept.append(line)
    return "\n".join(kept)


def _shield_markup(match: re.Match[str]) -> str:
    """``<nowiki>``/``<pre>`` content as literal text: markup characters become HTML entities,
    which no later step matches and :func:`html.unescape` turns back at the end."""
    return "".join(f"&#{ord(c)};" if c in _WIKI_MARKUP_CHARS else c for c in match.group(2))


def _language_variant(text: str) -> str:
    """``zh-hans:计算机; zh-hant:電腦;`` -> ``计算机`` (zh-hans, else zh-cn, else the first
    variant); text that does not start with a variant code is returned as it is."""
    variants: dict[str, str] = {}
    for part in _LANG_VARIANT_SPLIT_RE.split(text.strip().rstrip(";")):
        match = _LANG_VARIANT_RE.fullmatch(part)
        if match is None:  # no variant code: plain text (only the first part can lack one)
            return text
        variants.setdefault(match.group(1), match.group(2).strip())
    for code in _LANG_PREFERRED_VARIANTS:
        if code in variants:
            return variants[code]
    return next(iter(variants.values()))


def _replace_language_conversion(match: re.Match[str]) -> str:
    content = match.group(1)
    flagged = _LANG_FLAGS_RE.fullmatch(content)
    if flagged is not None:
        flags, content = set(re.split(r"\s*;\s*", flagged.group(1))), flagged.group(2)
        if "A" not in flags and flags & {"H", "T", "-"}:
            return ""  # a conversion rule for the page or its title: nothing is displayed
    return _language_variant(content)


def replace_language_conversion(text: str) -> str:
    """Resolve MediaWiki language-conversion markup (zhwiki), shown as simplified Chinese.

    ``-{zh-hans:计算机; zh-hant:電腦;}-`` -> the zh-hans variant (else zh-cn, else the first one);
    ``-{Foo}-`` -> ``Foo``; rules that display nothing, ``-{H|...}-``, ``-{T|...}-`` and
    ``-{-|...}-``, are dropped; ``-{A|...}-`` (a rule that is also displayed), other flags and
    variant lists (``-{zh-hans;zh-hant|文字}-``) show their content like a plain ``-{...}-``.
    """
    return _LANG_CONVERSION_RE.sub(_replace_language_conversion, text)


def _replace_link(match: re.Match[str]) -> str:
    target, _, label = match.group(1).partition("|")
    namespace = target.strip().lstrip(":").split(":", 1)[0].strip().lower() if ":" in target else ""
    if namespace in _DROPPED_LINK_NAMESPACES:
        return ""
    return label if label else target


def replace_links(text: str) -> str:
    """Resolve internal links innermost first, so ``[[File:x|a [[b]] c]]`` vanishes whole."""
    while True:
        new = _INNER_LINK_RE.sub(_replace_link, text)
        if new == text:
            return new
        text = new


def clean_wikitext(text: str) -> str:
    """Plain text of one article's wikitext (see the module docstring for the steps)."""
    text = _COMMENT_RE.sub("", text)
    text = _NOWIKI_EMPTY_RE.sub("", text)
    text = _NOWIKI_RE.sub(_shield_markup, text)
    text = _DROPPED_TAG_RE.sub("", text)
    text = _REF_SELF_CLOSING_RE.sub("", text)
    text = _REF_RE.sub("", text)
    text = remove_templates(text)
    text = remove_tables(text)
    text = replace_language_conversion(text)
    text = _EXTERNAL_LINK_RE.sub(lambda m: m.group(1) or "", text)
    text = replace_links(text)
    text = _BOLD_ITALIC_RE.sub("", text)
    text = _HEADING_RE.sub(lambda m: m.group(2), text)
    text = _BR_RE.sub("\n", text)
    text = _TAG_RE.sub("", text)
    text = html.unescape(text)
    text = _MAGIC_WORD_RE.sub("", text)
    text = _LIST_MARKER_RE.sub("", text)
    lines = [line.strip() for line in text.split("\n")]
    return _BLANK_LINES_RE.sub("\n\n", "\n".join(lines)).strip()


@dataclass
class ExtractStats:
    pages: int = 0
    articles: int = 0
    redirects: int = 0
    other_namespace: int = 0
    empty: int = 0


def _local(tag: str) -> str:
    """``{http://www.mediawiki.org/xml/export-0.10/}page`` -> ``page``."""
    return tag.rsplit("}", 1)[-1]


def _child(elem: ET.Element, name: str) -> ET.Element | None:
    for child in elem:
        if _local(child.tag) == name:
            return child
    return None


def _open_dump(path: Path) -> IO[bytes]:
    if not path.is_file():
        raise DataError(f"input dump {str(path)!r} does not exist")
    return bz2.open(path, "rb") if path.suffix == ".bz2" else open(path, "rb")


def iter_articles(path: str | os.PathLike, stats: ExtractStats) -> Iterator[tuple[str, str]]:
    """Yield ``(title, clean text)`` for each article of the dump, in dump order."""
    path = Path(path)
    with _open_dump(path) as f:
        root = None
        try:
            for event, elem in ET.iterparse(f, events=("start", "end")):
                if root is None:
                    root = elem
                if event != "end" or _local(elem.tag) != "page":
                    continue
                stats.pages += 1
                article = _page_article(elem, stats)
                root.clear()  # drop the finished page (and any earlier siblings)
                if article is not None:
                    yield article
        except ET.ParseError as e:
            raise DataError(f"{path}: malformed XML ({e})") from e
        except (OSError, EOFError) as e:  # truncated or corrupt .bz2
            raise DataError(f"{path}: cannot read dump: {e}") from e


def _page_article(page: ET.Element, stats: ExtractStats) -> tuple[str, str] | None:
    ns = _child(page, "ns")
    if ns is not None and (ns.text or "").strip() != "0":
        stats.other_namespace += 1
        return None
    revision = _child(page, "revision")
    text_elem = _child(revision, "text") if revision is not None else None
    raw = (text_elem.text or "") if text_elem is not None else ""
    if _child(page, "redirect") is not None or _REDIRECT_RE.match(raw):
        stats.redirects += 1
        return None
    title_elem = _child(page, "title")
    title = (title_elem.text or "").strip() if title_elem is not None else ""
    text = clean_wikitext(raw)
    if not text:
        stats.empty += 1
        return None
    stats.articles += 1
    return title, text


def extract(input_path: str | os.PathLike, output_path: str | os.PathLike) -> ExtractStats:
    """Write the articles of a dump as JSON lines; atomic (a temp file renamed at the end)."""
    output_path = Path(output_path)
    if output_path.is_dir():  # checked before the dump is read, not after hours of parsing
        raise DataError(f"output {str(output_path)!r} is a directory; give a .jsonl file path")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(output_path.name + ".tmp")
    stats = ExtractStats()
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for title, text in tqdm(iter_articles(input_path, stats), unit="article", disable=None):
                out.write(json.dumps({"title": title, "text": text}, ensure_ascii=False) + "\n")
        os.replace(tmp, output_path)
    finally:
        tmp.unlink(missing_ok=True)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="MediaWiki XML dump, .xml or .xml.bz2")
    parser.add_argument("--output", required=True, help="output .jsonl path")
    args = parser.parse_args()
    setup_logging()
    stats = extract(args.input, args.output)
    logger.info(
        "%d pages: %d articles written to %s; skipped %d redirects, %d non-article pages, "
        "%d empty after cleaning", stats.pages, stats.articles, args.output, stats.redirects,
        stats.other_namespace, stats.empty,
    )


if __name__ == "__main__":
    run_cli(main)
