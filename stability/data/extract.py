"""Text extraction used by the sample-corpus builder: HTML paragraphs and R lazy-load data.

Only `build_sample.py` (a maintainer script) uses this module; training never imports it.
Everything here is standard library.
"""

from __future__ import annotations

import gzip
import re
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path

# Characters that are written without spaces between them: kana, CJK ideographs, CJK and
# full-width punctuation. A line break between two of them is not a word break.
_WIDE = "\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef"
_WIDE_BREAK = re.compile(rf"(?<=[{_WIDE}])[ \t]*\n\s*(?=[{_WIDE}])")
_SPACES = re.compile(r"\s+")
JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")
"""Matches one hiragana, katakana or common CJK ideograph."""


def normalize_whitespace(text: str) -> str:
    """Collapses whitespace to single spaces; joins Japanese lines broken inside a sentence."""
    return _SPACES.sub(" ", _WIDE_BREAK.sub("", text)).strip()


# Elements whose text is never prose.
_SKIP_TAGS = {
    "head", "script", "style", "pre", "noscript", "form", "button", "header", "footer", "nav",
}  # fmt: skip
# Navigation, tables of contents and permalinks in DocBook and Sphinx output.
_SKIP_CLASSES = {
    "navheader", "navfooter", "toc", "related", "footer", "sphinxsidebar", "docnav",
    "headerlink", "indexterm", "banner", "searchbox", "highlight", "screen", "programlisting",
    "footnotes", "footnote", "legalnotice", "debug", "index-label", "list-of-tables",
    "list-of-figures", "list-of-examples",
}  # fmt: skip
_SKIP_IDS = {"banner", "title", "searchbox"}
_BLOCK_TAGS = {
    "p", "div", "section", "article", "li", "ul", "ol", "dl", "dt", "dd", "table", "tr", "td",
    "th", "blockquote", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "caption", "figure",
}  # fmt: skip
_HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
_VOID_TAGS = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "wbr"}


class _ParagraphParser(HTMLParser):
    """Splits an HTML page into paragraphs at block elements, skipping navigation and code."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[tuple[str, bool]] = []  # (text, is_heading)
        self._buffer: list[str] = []
        self._skip_stack: list[str] = []  # open tags of the element being skipped
        self._heading_depth = 0

    def _flush(self) -> None:
        text = normalize_whitespace("".join(self._buffer))
        self._buffer = []
        if text:
            self.paragraphs.append((text, self._heading_depth > 0))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID_TAGS:
            if not self._skip_stack and tag in _BLOCK_TAGS:
                self._flush()
            return
        if self._skip_stack:
            self._skip_stack.append(tag)
            return
        attributes = dict(attrs)
        classes = set((attributes.get("class") or "").split())
        if tag in _SKIP_TAGS or classes & _SKIP_CLASSES or attributes.get("id") in _SKIP_IDS:
            self._skip_stack.append(tag)
            return
        if tag in _BLOCK_TAGS:
            self._flush()
        if tag in _HEADINGS:
            self._heading_depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID_TAGS:
            return
        if self._skip_stack:
            # Pop up to the matching open tag; tolerates unclosed tags inside skipped regions.
            while self._skip_stack and self._skip_stack.pop() != tag:
                pass
            return
        if tag in _BLOCK_TAGS:
            self._flush()
        if tag in _HEADINGS and self._heading_depth > 0:
            self._heading_depth -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip_stack:
            self._buffer.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def html_paragraphs(html: str) -> list[tuple[str, bool]]:
    """Returns the prose paragraphs of an HTML page as (text, is_heading) pairs, in page order."""
    parser = _ParagraphParser()
    parser.feed(html)
    parser.close()
    return parser.paragraphs


# --- R lazy-load data (janeaustenr's data/Rdata.rdb + .rdx) -------------------------------------
#
# An .rdx file is a gzip-compressed R serialization of a list whose `variables` entry maps each
# object name to an (offset, length) pair in the .rdb file; each .rdb blob is a 4-byte big-endian
# uncompressed length followed by a zlib stream holding the object's R serialization.
# The reader below decodes the XDR serialization format (versions 2 and 3) far enough for
# character vectors, lists, integer/double/logical vectors and attributes.

_NILVALUE, _REFSXP, _GLOBALENV, _EMPTYENV, _BASEENV, _BASENAMESPACE = 254, 255, 253, 242, 241, 247
_NA_STRING_LENGTH = -1


class _RReader:
    """Reads one R object from XDR serialization bytes."""

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise ValueError(f"not an XDR R serialization (header {data[:2]!r})")
        self.data = data
        self.pos = 2
        version = self._int()
        self._int()  # R version that wrote it
        self._int()  # minimal R version to read it
        if version == 3:
            encoding_length = self._int()
            self.pos += encoding_length  # skip the native encoding name
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")
        self.refs: list[object] = []

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def _bytes(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def read(self) -> object:
        flags = self._int()
        sexptype = flags & 0xFF
        has_attributes = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if sexptype in (_NILVALUE, _GLOBALENV, _EMPTYENV, _BASEENV, _BASENAMESPACE):
            return None
        if sexptype == _REFSXP:
            return self.refs[(flags >> 8) - 1]
        if sexptype == 1:  # SYMSXP
            symbol = self.read()
            self.refs.append(symbol)
            return symbol
        if sexptype == 9:  # CHARSXP
            length = self._int()
            return None if length == _NA_STRING_LENGTH else self._bytes(length).decode("utf-8")
        if sexptype == 2:  # LISTSXP (pairlist): returned as a dict tag -> value
            out: dict[str, object] = {}
            while sexptype == 2:
                if has_attributes:
                    self.read()
                tag = self.read() if has_tag else str(len(out))
                out[str(tag)] = self.read()
                flags = self._int()
                sexptype = flags & 0xFF
                has_attributes = bool(flags & (1 << 9))
                has_tag = bool(flags & (1 << 10))
            return out  # the terminating NILVALUE was consumed by the loop
        if sexptype in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            value: object = [self.read() for _ in range(self._int())]
        elif sexptype in (10, 13):  # LGLSXP, INTSXP
            n = self._int()
            value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif sexptype == 14:  # REALSXP
            n = self._int()
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        else:
            raise ValueError(f"unsupported R object type {sexptype} at byte {self.pos - 4}")
        if has_attributes:
            attributes = self.read()
            names = attributes.get("names") if isinstance(attributes, dict) else None
            if names is not None and isinstance(value, list):
                return dict(zip(names, value, strict=True))
        return value


def read_r_lazyload(prefix: Path) -> dict[str, object]:
    """Reads every object of an R lazy-load database (`prefix.rdx` + `prefix.rdb`).

    Returns:
        A dict from object name to its value: character vectors become lists of str (None for
        NA), named lists become dicts.
    """
    index = _RReader(gzip.decompress(prefix.with_suffix(".rdx").read_bytes())).read()
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise ValueError(f"{prefix}.rdx has no 'variables' table")
    database = prefix.with_suffix(".rdb").read_bytes()
    objects: dict[str, object] = {}
    for name, (offset, length) in index["variables"].items():
        blob = database[int(offset) : int(offset) + int(length)]
        raw = zlib.decompress(blob[4:])
        if len(raw) != struct.unpack(">I", blob[:4])[0]:
            raise ValueError(f"{prefix}.rdb: object {name!r} has the wrong length")
        objects[name] = _RReader(raw).read()
    return objects
