"""Build the bundled sample corpus ``data/sample/`` from text that ships in Debian packages.

    apt-get install -y fortunes fortunes-min fortunes-zh debian-handbook
    python -m data.build_sample_corpus [--out_dir=data/sample] [--seed=1234]

Sources (all real text, no synthetic filler), one output file per source:

================  ====  ========================================================  ==========
source            lang  where from                                                format
================  ====  ========================================================  ==========
fortunes_en       en    ``fortunes``: quotes, jokes, definitions (one per cookie)  .parquet
fortunes_min_en   en    ``fortunes-min``: fortunes, literature, riddles             .json
poems_zh          zh    ``fortunes-zh``: tang300 + song100 (Tang and Song poems)    .json
sayings_zh        zh    ``fortunes-zh``: chinese (modern sayings, jokes, quotes)    .parquet
handbook_en       en    ``debian-handbook``: html/en-US, one document per section   .jsonl
handbook_zh       zh    ``debian-handbook``: html/zh-CN, one document per section   .jsonl
================  ====  ========================================================  ==========

Every record is ``{"text": str, "source": str, "lang": "en" | "zh"}``. Exact duplicate texts
within a source are dropped (the first occurrence is kept). ``max(1, round(2%))`` of the
documents of each source go to ``heldout/`` (the ones with the smallest seeded sha256 of their
text), the rest to ``pretrain/``, both in original order. The output is byte-for-byte
deterministic for a given set of package versions and seed.

Cleaning:
- fortunes: cookies are separated by lines holding a single ``%``; overstrike sequences
  (``X<BS>X``, used for bold/underline on terminals) keep the visible character; other control
  characters (bell, stray C1 bytes) and ANSI colour escapes (``ESC[..m`` in fortunes-zh) are
  removed; trailing spaces per line are stripped.
- handbook: HTML is parsed with the stdlib ``html.parser``; ``<head>``, the download banner,
  navigation bars (``docnav``), tables of contents and index anchors are dropped; block elements
  become paragraphs separated by a blank line, ``<pre>`` keeps its layout. Pages are split into
  one document per section/subsection heading (h1-h3). The zh-CN translation is incomplete:
  prose paragraphs left in English (40+ ASCII letters, under 5% CJK) are dropped, and then any
  zh document whose letters are less than 25% CJK, so ``lang`` stays truthful.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from utils.errors import DataError, run_cli
from utils.logging_utils import get_logger, setup_logging

logger = get_logger(__name__)

PACKAGES = ("fortunes", "fortunes-min", "fortunes-zh", "debian-handbook")
APT_HINT = "run: apt-get update && apt-get install -y " + " ".join(PACKAGES)
FORTUNE_DIR = Path("/usr/share/games/fortunes")
HANDBOOK_DIR = Path("/usr/share/doc/debian-handbook/html")
ZH_FORTUNE_FILES = ("tang300", "song100", "chinese")
# ascii-art holds pictures, not language; translate-me is a note to translators.
SKIPPED_FORTUNE_FILES = ("ascii-art", "translate-me")
HELDOUT_FRACTION = 0.02
MIN_CJK_SHARE = 0.25
PARQUET_ROW_GROUP = 512  # several row groups per file, so split_ranges has work to do


@dataclass(frozen=True)
class Source:
    name: str
    lang: str
    package: str
    suffix: str  # output format: .jsonl, .json (array) or .parquet


SOURCES = (
    Source("fortunes_en", "en", "fortunes", ".parquet"),
    Source("fortunes_min_en", "en", "fortunes-min", ".json"),
    Source("poems_zh", "zh", "fortunes-zh", ".json"),
    Source("sayings_zh", "zh", "fortunes-zh", ".parquet"),
    Source("handbook_en", "en", "debian-handbook", ".jsonl"),
    Source("handbook_zh", "zh", "debian-handbook", ".jsonl"),
)


# ----------------------------------------------------------------------------------------------
# Debian packages


def package_version(package: str) -> str:
    """The installed version of a Debian package; DataError (with the apt-get line) if absent."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}\t${Version}", package],
            capture_output=True, text=True, check=False,
        )
    except FileNotFoundError as e:
        raise DataError(f"dpkg-query not found: this builder needs a Debian system ({e})") from e
    status, _, version = out.stdout.partition("\t")
    if out.returncode != 0 or not status.endswith(" installed"):
        raise DataError(f"Debian package {package!r} is not installed; {APT_HINT}")
    return version


def package_files(package: str) -> list[Path]:
    """Regular files installed by ``package`` (``dpkg -L``), sorted."""
    out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise DataError(f"cannot list files of Debian package {package!r}: {out.stderr.strip()}")
    paths = map(Path, out.stdout.split("\n"))
    return sorted(p for p in paths if p.is_file() and not p.is_symlink())


# ----------------------------------------------------------------------------------------------
# fortune files

_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_OVERSTRIKE_RE = re.compile(r".\x08")


def clean_fortune(text: str) -> str:
    """Strip ANSI escapes, overstrikes and control characters (except newline and tab)."""
    text = _ANSI_RE.sub("", text)
    text = _OVERSTRIKE_RE.sub("", text)
    text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c) != "Cc")
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip("\n")


def split_fortunes(raw: str) -> Iterator[str]:
    """The cleaned cookies of one fortune file: blocks separated by lines that are just ``%``."""
    block: list[str] = []
    for line in raw.split("\n") + ["%"]:
        if line.rstrip("\r") == "%":
            text = clean_fortune("\n".join(block))
            block.clear()
            if text.strip():
                yield text
        else:
            block.append(line)


def fortune_paths(package: str, names: tuple[str, ...] | None = None) -> list[Path]:
    """The fortune text files of a package (not ``.dat`` indexes nor ``.u8`` links)."""
    paths = [
        p for p in package_files(package)
        if p.parent == FORTUNE_DIR and not p.suffix and p.name not in SKIPPED_FORTUNE_FILES
    ]
    if names is not None:
        by_name = {p.name: p for p in paths}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise DataError(f"package {package!r} lacks fortune files {missing}; {APT_HINT}")
        paths = [by_name[n] for n in names]
    return paths


def fortune_documents(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        yield from split_fortunes(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# Debian Administrator's Handbook (HTML)

_BLOCK_TAGS = {
    "p", "div", "pre", "li", "ul", "ol", "dl", "dt", "dd", "table", "tr", "blockquote",
    "h1", "h2", "h3", "h4", "h5", "h6", "br", "hr",
}
_HEADING_TAGS = {"h1", "h2", "h3"}
_VOID_TAGS = {"br", "hr", "img", "meta", "link", "input", "col", "area", "base", "wbr"}
_CHROME_CLASSES = {"docnav", "toc", "indexterm", "list-of-figures", "list-of-tables",
                   "list-of-examples"}
_CHROME_IDS = {"banner", "title"}


class HandbookPageParser(HTMLParser):
    """Collect the readable blocks of one publican/DocBook HTML page.

    ``blocks`` is a list of ``(kind, text)`` with kind ``heading`` (h1-h3, section titles),
    ``pre`` (preformatted: code, screen output) or ``text``.
    Skipped subtrees (head, navigation, tables of contents) are tracked by tag depth.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[str, str]] = []
        self._parts: list[str] = []
        self._stack: list[str] = []
        self._skip_depth: int | None = None  # stack depth of the skipped subtree's root
        self._pre_depth = 0
        self._heading = False

    def _flush(self) -> None:
        text = "".join(self._parts)
        self._parts.clear()
        if self._pre_depth == 0:
            text = re.sub(r"\s+", " ", text).strip()
            kind = "heading" if self._heading else "text"
        else:
            text = "\n".join(line.rstrip() for line in text.strip("\n").split("\n"))
            kind = "pre"
        if text.strip():
            self.blocks.append((kind, text))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID_TAGS:
            if tag == "br" and self._skip_depth is None:
                self._parts.append("\n" if self._pre_depth else " ")
            return
        self._stack.append(tag)
        if self._skip_depth is not None:
            return
        attr = dict(attrs)
        classes = set((attr.get("class") or "").split())
        if tag == "head" or classes & _CHROME_CLASSES or attr.get("id") in _CHROME_IDS:
            self._skip_depth = len(self._stack)
            return
        if tag in _BLOCK_TAGS:
            self._flush()
            self._heading = tag in _HEADING_TAGS
        if tag == "pre":
            self._pre_depth += 1
        elif tag in ("td", "th"):
            self._parts.append(" ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _VOID_TAGS:  # XHTML <a id="x"/>: an empty element
            self.handle_starttag(tag, attrs)
            self.handle_endtag(tag)
        else:
            self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID_TAGS or tag not in self._stack:
            return
        # Pop up to and including the matching tag (tolerates unclosed children).
        while self._stack:
            open_tag = self._stack.pop()
            depth = len(self._stack) + 1
            if self._skip_depth is not None:
                if depth == self._skip_depth:
                    self._skip_depth = None
            else:
                if open_tag in _BLOCK_TAGS:
                    self._flush()
                    self._heading = False
                if open_tag == "pre":
                    self._pre_depth -= 1
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._skip_depth is None and self._stack:
            self._parts.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def split_sections(blocks: list[tuple[str, str]]) -> list[str]:
    """Group blocks into documents: a heading that follows body text starts a new document.
    Documents without body text (a lone title) are dropped."""
    docs: list[tuple[list[str], bool]] = []  # (texts, has_body)
    for kind, text in blocks:
        is_heading = kind == "heading"
        if not docs or (is_heading and docs[-1][1]):
            docs.append(([], False))
        texts, has_body = docs[-1]
        texts.append(text)
        docs[-1] = (texts, has_body or not is_heading)
    return ["\n\n".join(texts) for texts, has_body in docs if has_body]


def html_to_sections(html: str, lang: str) -> list[str]:
    """The section documents of one handbook page; for ``zh`` without untranslated paragraphs."""
    parser = HandbookPageParser()
    parser.feed(html)
    parser.close()
    blocks = parser.blocks
    if lang == "zh":
        blocks = [(k, t) for k, t in blocks if not (k == "text" and is_untranslated(t))]
    return [d for d in split_sections(blocks) if lang != "zh" or cjk_share(d) >= MIN_CJK_SHARE]


def is_untranslated(paragraph: str) -> bool:
    """A prose paragraph of the zh-CN pages left in English: 40+ ASCII letters, under 5% CJK."""
    return sum(c.isascii() and c.isalpha() for c in paragraph) >= 40 and cjk_share(paragraph) < 0.05


def cjk_share(text: str) -> float:
    """Fraction of letters that are CJK ideographs (0.0 when there are no letters)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    cjk = sum(1 for c in letters if "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf")
    return cjk / len(letters)


def handbook_documents(locale: str, lang: str) -> Iterator[str]:
    pages = sorted(
        p for p in package_files("debian-handbook")
        if p.parent == HANDBOOK_DIR / locale and p.suffix == ".html"
    )
    if not pages:
        raise DataError(f"no HTML pages for locale {locale!r} under {HANDBOOK_DIR}; {APT_HINT}")
    for page in pages:
        yield from html_to_sections(page.read_text(encoding="utf-8"), lang)


def source_documents(source: Source) -> Iterator[str]:
    if source.name == "fortunes_en":
        yield from fortune_documents(fortune_paths("fortunes"))
    elif source.name == "fortunes_min_en":
        yield from fortune_documents(fortune_paths("fortunes-min"))
    elif source.name == "poems_zh":
        yield from fortune_documents(fortune_paths("fortunes-zh", ("tang300", "song100")))
    elif source.name == "sayings_zh":
        yield from fortune_documents(fortune_paths("fortunes-zh", ("chinese",)))
    elif source.name == "handbook_en":
        yield from handbook_documents("en-US", "en")
    elif source.name == "handbook_zh":
        yield from handbook_documents("zh-CN", "zh")
    else:
        raise AssertionError(f"no reader for source {source.name!r}")


# ----------------------------------------------------------------------------------------------
# split and write


def split_heldout(docs: list[str], source: str, seed: int) -> tuple[list[str], list[str]]:
    """(pretrain, heldout): the ``max(1, round(2% of n))`` docs with the smallest seeded hash
    are held out; both lists keep the input order."""
    def key(text: str) -> bytes:
        return hashlib.sha256(f"{seed}\0{source}\0{text}".encode("utf-8")).digest()

    n_heldout = max(1, round(len(docs) * HELDOUT_FRACTION)) if docs else 0
    held = set(sorted(range(len(docs)), key=lambda i: key(docs[i]))[:n_heldout])
    pretrain = [d for i, d in enumerate(docs) if i not in held]
    heldout = [d for i, d in enumerate(docs) if i in held]
    return pretrain, heldout


def write_records(path: Path, records: list[dict[str, str]]) -> None:
    """Write records in the format named by the suffix, deterministically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(
            records, schema=pa.schema([("text", pa.string()), ("source", pa.string()),
                                       ("lang", pa.string())]),
        )
        pq.write_table(table, path, row_group_size=PARQUET_ROW_GROUP, compression="zstd")
        return
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    if path.suffix == ".json":
        body = "[\n" + ",\n".join(lines) + "\n]\n"
    else:
        body = "".join(line + "\n" for line in lines)
    path.write_text(body, encoding="utf-8")


def dedupe(docs: Iterator[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for doc in docs:
        if doc not in seen:
            seen.add(doc)
            out.append(doc)
    return out


def build(out_dir: Path, seed: int) -> list[dict[str, object]]:
    """Build every source into ``out_dir/{pretrain,heldout}``; returns per-source statistics."""
    versions = {p: package_version(p) for p in PACKAGES}  # fail early, before writing anything
    stats = []
    for source in SOURCES:
        docs = dedupe(source_documents(source))
        if not docs:
            raise DataError(f"source {source.name}: no documents found; {APT_HINT}")
        splits = zip(("pretrain", "heldout"), split_heldout(docs, source.name, seed))
        for split, split_docs in splits:
            records = [{"text": d, "source": source.name, "lang": source.lang} for d in split_docs]
            path = out_dir / split / f"{source.name}{source.suffix}"
            write_records(path, records)
            stats.append({
                "source": source.name, "lang": source.lang, "split": split,
                "package": f"{source.package} {versions[source.package]}",
                "docs": len(split_docs),
                "text_mb": sum(len(d.encode("utf-8")) for d in split_docs) / 1e6,
                "file": str(path), "file_mb": path.stat().st_size / 1e6,
            })
            logger.info("%-16s %-8s %6d docs %6.2f MB text -> %s", source.name, split,
                        len(split_docs), stats[-1]["text_mb"], path)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default="data/sample", help="output directory")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the held-out hash")
    args = parser.parse_args()
    setup_logging()
    stats = build(Path(args.out_dir), args.seed)
    total = sum(s["file_mb"] for s in stats)
    for lang in ("en", "zh"):
        sel = [s for s in stats if s["lang"] == lang]
        logger.info("lang %s: %d docs, %.2f MB text", lang, sum(s["docs"] for s in sel),
                    sum(s["text_mb"] for s in sel))
    logger.info("total on disk: %.2f MB in %d files", total, len(stats))


if __name__ == "__main__":
    run_cli(main)
