"""Builds the embedded sample corpus and its tokenizer from Debian packages.

A maintainer runs this once; its outputs under `stability/data/sample/` are committed:

    python -m stability.data.build_sample                   # corpus + tokenizer + PROVENANCE.md
    python -m stability.data.build_sample --tokenizer-only  # retrain the tokenizer only

The full build needs `apt-get` and `dpkg-deb` (no root: `apt-get download` fetches a package
without installing it) and takes about a minute. Package versions are pinned (Debian 12); pass
`--unpinned` to take whatever version apt offers, then commit the regenerated PROVENANCE.md.
"""

from __future__ import annotations

import argparse
import json
import lzma
import random
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from stability.data.extract import (
    JAPANESE,
    html_paragraphs,
    normalize_whitespace,
    read_r_lazyload,
)
from stability.data.sample import (
    SAMPLE_CORPUS,
    SAMPLE_DIR,
    SAMPLE_TOKENIZER,
    iter_sample_documents,
)
from stability.data.tokenizer import DEFAULT_VOCAB_SIZE, TRAINER_SETTINGS, Tokenizer
from stability.data.tokenizer import train_tokenizer as train_sentencepiece

SHUFFLE_SEED = 20240611
"""Documents are written in a fixed shuffled order, so a contiguous megatron split (train,
valid, test) draws every split from every source."""

MAX_DOCUMENT_CHARS = 6000
"""HTML pages longer than this are cut into several documents at paragraph boundaries."""

MIN_PARAGRAPH_CHARS = {"en": 40, "ja": 10}
"""Shorter non-heading paragraphs (table cells, captions, menu labels) are dropped."""

AUSTEN_LICENSE = "public domain (text); janeaustenr package MIT"
GPL2 = "GPL-2.0-or-later"


@dataclass(frozen=True)
class Source:
    """One group of documents from one Debian package.

    Attributes:
        name: Short identifier, written into each document's `source` field.
        package: Debian package name.
        version: Pinned package version (Debian 12 "bookworm").
        lang: "en" or "ja".
        license: SPDX-style licence of the text.
        files: Globs inside the unpacked package (HTML pages), or for Austen the R data prefix.
        exclude: File names to skip (licence appendices, indexes).
        r_object: For the Austen source, the name of the novel's R object.
    """

    name: str
    package: str
    version: str
    lang: str
    license: str
    files: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    r_object: str | None = None


SOURCES: tuple[Source, ...] = (
    Source(
        "austen/pride-and-prejudice", "r-cran-janeaustenr", "1.0.0-1", "en", AUSTEN_LICENSE,
        ("usr/lib/R/site-library/janeaustenr/data/Rdata",), r_object="prideprejudice",
    ),
    Source(
        "austen/persuasion", "r-cran-janeaustenr", "1.0.0-1", "en", AUSTEN_LICENSE,
        ("usr/lib/R/site-library/janeaustenr/data/Rdata",), r_object="persuasion",
    ),
    Source(
        "debian-reference/en", "debian-reference-en", "2.100", "en", GPL2,
        ("usr/share/debian-reference/*.en.html",),
    ),
    Source(
        "maint-guide/en", "maint-guide", "1.2.53", "en", GPL2,
        ("usr/share/doc/maint-guide/html/*.en.html",),
    ),
    Source(
        "installation-guide/en", "installation-guide-amd64", "20230508+deb12u1", "en",
        "GPL-2.0-only", ("usr/share/doc/installation-guide-amd64/en/*.html",),
        exclude=("apf.html",),  # the GPL text itself
    ),
    Source(
        "debian-handbook/ja", "debian-handbook", "11.20220922", "ja",
        "GPL-2.0-or-later OR CC-BY-SA-3.0", ("usr/share/doc/debian-handbook/html/ja-JP/*.html",),
    ),
    Source(
        "debian-reference/ja", "debian-reference-ja", "2.100", "ja", GPL2,
        ("usr/share/debian-reference/*.ja.html",),
    ),
    Source(
        "developers-reference/ja", "developers-reference-ja", "12.18", "ja", GPL2,
        ("usr/share/developers-reference/ja/*.html",), exclude=("genindex.html", "search.html"),
    ),
    Source(
        "installation-guide/ja", "installation-guide-amd64", "20230508+deb12u1", "ja",
        "GPL-2.0-only", ("usr/share/doc/installation-guide-amd64/ja/*.html",),
        exclude=("apf.html",),  # the GPL text itself
    ),
    Source(
        "maint-guide/ja", "maint-guide-ja", "1.2.53", "ja", GPL2,
        ("usr/share/doc/maint-guide-ja/html/*.ja.html",),
    ),
    Source(
        "aptitude-doc/ja", "aptitude-doc-ja", "0.8.13-5", "ja", GPL2,
        ("usr/share/doc/aptitude/html/ja/*.html",),
    ),
    Source(
        "debian-edu-doc/ja", "debian-edu-doc-ja", "2.12.23~deb12u1", "ja", GPL2,
        ("usr/share/doc/debian-edu-doc-ja/debian-edu-bookworm-manual.html",),
    ),
    Source(
        "libreoffice-help/ja", "libreoffice-help-ja", "4:7.4.7-1+deb12u14", "ja",
        "MPL-2.0 (parts Apache-2.0)", ("usr/share/libreoffice/help/ja/text/**/*.html",),
    ),
)  # fmt: skip


def fetch_packages(sources: tuple[Source, ...], workdir: Path, pinned: bool) -> dict[str, Path]:
    """Downloads and unpacks each package once; returns package name -> unpacked root."""
    debs = workdir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    roots: dict[str, Path] = {}
    for source in sources:
        if source.package in roots:
            continue
        spec = f"{source.package}={source.version}" if pinned else source.package
        result = subprocess.run(
            ["apt-get", "download", spec], cwd=debs, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise SystemExit(
                f"apt-get download {spec} failed (run 'apt-get update' first; with a newer "
                f"Debian, pass --unpinned):\n{result.stderr.strip()}"
            )
        (deb,) = sorted(debs.glob(f"{source.package}_*.deb"))
        root = workdir / "root" / source.package
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        roots[source.package] = root
    return roots


def package_version(package: str, workdir: Path) -> str:
    """Returns the version of the downloaded .deb of `package`."""
    (deb,) = sorted((workdir / "debs").glob(f"{package}_*.deb"))
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
    ).stdout.strip()


def _keep(text: str, is_heading: bool, lang: str) -> bool:
    if lang == "ja" and not JAPANESE.search(text):
        return False  # untranslated English paragraphs in the Japanese editions
    return is_heading or len(text) >= MIN_PARAGRAPH_CHARS[lang]


def _pack(paragraphs: list[tuple[str, bool]]) -> list[str]:
    """Groups paragraphs into documents of at most about MAX_DOCUMENT_CHARS characters,
    starting a new document at a heading once the current one has a third of that."""
    documents: list[list[str]] = [[]]
    size = 0
    for text, is_heading in paragraphs:
        if size >= MAX_DOCUMENT_CHARS or (is_heading and size >= MAX_DOCUMENT_CHARS // 3):
            documents.append([])
            size = 0
        documents[-1].append(text)
        size += len(text)
    return ["\n\n".join(doc) for doc in documents if doc]


def html_documents(source: Source, root: Path) -> list[str]:
    """Extracts the documents of an HTML source: cleaned paragraphs, deduplicated, packed."""
    files = sorted({path for pattern in source.files for path in root.glob(pattern)})
    files = [path for path in files if path.name not in source.exclude]
    if not files:
        raise SystemExit(f"{source.name}: no file matches {source.files} under {root}")
    seen: set[str] = set()
    documents: list[str] = []
    for path in files:
        paragraphs = []
        for text, is_heading in html_paragraphs(path.read_text(encoding="utf-8")):
            if not _keep(text, is_heading, source.lang) or (not is_heading and text in seen):
                continue
            seen.add(text)
            paragraphs.append((text, is_heading))
        # A page left with headings only carries no prose.
        if any(not is_heading for _, is_heading in paragraphs):
            documents.extend(_pack(paragraphs))
    return documents


_CHAPTER = re.compile(r"^(CHAPTER|Chapter) [0-9IVXLC]+\.?$")


def austen_documents(source: Source, root: Path) -> list[str]:
    """Returns one document per chapter of a janeaustenr novel (front matter dropped)."""
    (prefix,) = source.files
    lines = read_r_lazyload(root / prefix)[source.r_object]
    chapters: list[list[str]] = []
    paragraph: list[str] = []
    for line in [*lines, ""]:
        line = line or ""
        if _CHAPTER.match(line.strip()):
            chapters.append([line.strip()])
        elif not line.strip():
            if paragraph and chapters:
                chapters[-1].append(normalize_whitespace(" ".join(paragraph)))
            paragraph = []
        else:
            paragraph.append(line)
    return ["\n\n".join(chapter) for chapter in chapters if len(chapter) > 1]


def build_documents(roots: dict[str, Path]) -> list[dict[str, str]]:
    """Extracts every source and returns the documents in their fixed shuffled order."""
    documents = []
    for source in SOURCES:
        root = roots[source.package]
        texts = austen_documents(source, root) if source.r_object else html_documents(source, root)
        documents += [
            {"text": text, "lang": source.lang, "source": source.name, "license": source.license}
            for text in texts
        ]
    random.Random(SHUFFLE_SEED).shuffle(documents)
    return documents


def write_corpus(documents: list[dict[str, str]], path: Path) -> None:
    """Writes JSON lines compressed with xz (preset 9, extreme); byte-identical on rerun."""
    payload = "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in documents)
    with lzma.open(path, "wb", preset=9 | lzma.PRESET_EXTREME) as out:
        out.write(payload.encode("utf-8"))


def training_sentences(documents: list[dict[str, str]]) -> list[str]:
    """The tokenizer's training lines: every paragraph of every document, in corpus order."""
    return [line for doc in documents for line in doc["text"].split("\n") if line.strip()]


def train_sample_tokenizer(documents: list[dict[str, str]], vocab_size: int) -> float:
    """Trains the sample tokenizer of ``vocab_size`` on the corpus (`sample/tokenizer.model` at
    8192, `sample/tokenizer-2k.model` at 2048); returns the seconds it took."""
    start = time.perf_counter()
    path = SAMPLE_TOKENIZER if vocab_size == DEFAULT_VOCAB_SIZE else (
        SAMPLE_DIR / f"tokenizer-{vocab_size // 1024}k.model")
    path.write_bytes(train_sentencepiece(training_sentences(documents), vocab_size))
    return time.perf_counter() - start


def corpus_statistics(documents: list[dict[str, str]], tokenizer: Tokenizer) -> dict:
    """Characters, tokens and documents per language and per source."""
    per_lang: dict[str, Counter] = {}
    per_source: dict[str, Counter] = {}
    for doc in documents:
        tokens = len(tokenizer.encode(doc["text"])) + 1  # + EOD
        for table, key in ((per_lang, doc["lang"]), (per_source, doc["source"])):
            row = table.setdefault(key, Counter())
            row["documents"] += 1
            row["characters"] += len(doc["text"])
            row["tokens"] += tokens
            row["unk"] += sum(1 for t in tokenizer.encode(doc["text"]) if t == tokenizer.unk)
    return {"lang": per_lang, "source": per_source}


def write_provenance(stats: dict, versions: dict[str, str]) -> None:
    """Writes sample/PROVENANCE.md: sources, versions, licences, sizes and cleaning."""
    corpus_mb = SAMPLE_CORPUS.stat().st_size / 1e6
    rows = []
    for source in SOURCES:
        row = stats["source"][source.name]
        rows.append(
            f"| {source.name} | {source.package} {versions[source.package]} | {source.lang} "
            f"| {source.license} | {row['documents']} | {row['characters']:,} |"
        )
    lang_rows = [
        f"| {lang} | {row['documents']} | {row['characters']:,} | {row['tokens']:,} "
        f"| {row['characters'] / row['tokens']:.2f} | {row['unk']} |"
        for lang, row in sorted(stats["lang"].items())
    ]
    settings = textwrap.fill(
        ", ".join(f"{key}={value}" for key, value in TRAINER_SETTINGS.items()), width=96
    )
    text = PROVENANCE_TEMPLATE.format(
        corpus_mb=corpus_mb,
        source_rows="\n".join(rows),
        lang_rows="\n".join(lang_rows),
        vocab_size=Tokenizer(SAMPLE_TOKENIZER).vocab_size,
        tokenizer_kb=SAMPLE_TOKENIZER.stat().st_size / 1e3,
        settings=settings,
        shuffle_seed=SHUFFLE_SEED,
        max_doc=MAX_DOCUMENT_CHARS,
        min_en=MIN_PARAGRAPH_CHARS["en"],
        min_ja=MIN_PARAGRAPH_CHARS["ja"],
    )
    (SAMPLE_DIR / "PROVENANCE.md").write_text(text, encoding="utf-8")


PROVENANCE_TEMPLATE = """\
# Sample corpus: provenance and licences

Generated by `python -m stability.data.build_sample` (do not edit by hand; edit the script).

`corpus.jsonl.xz` ({corpus_mb:.2f} MB) holds one JSON object per line: `text`, `lang` (`en` or
`ja`), `source` and `license`. All text comes from Debian 12 ("bookworm") packages fetched with
`apt-get download` and unpacked with `dpkg-deb -x`. Every source is free to redistribute and
modify; the licence of each document is in its own `license` field. The corpus is an aggregate
of separately licensed works; copyleft terms apply to each work, not to this repository's code.

## Sources

| source | Debian package | lang | licence | documents | characters |
|---|---|---|---|---|---|
{source_rows}

Upstream authors and copyright holders are listed in each package's
`/usr/share/doc/PACKAGE/copyright` file. Pride and Prejudice (1813) is in the public domain; the
R package that carries it (janeaustenr, Julia Silge) is MIT-licensed. The Debian documentation
(Debian Reference by Osamu Aoki; The Debian Administrator's Handbook by Raphaël Hertzog and
Roland Mas; the Developer's Reference, the New Maintainers' Guide, the Installation Guide, the
aptitude manual and the Debian Edu manual, with their translators) is licensed as listed above.

## Per language

| lang | documents | characters | tokens (with EOD) | characters/token | unknown tokens |
|---|---|---|---|---|---|
{lang_rows}

## Cleaning

- HTML: text of block elements (paragraphs, headings, list items, table cells); navigation,
  tables of contents, index terms, permalinks, footnotes, `<pre>` code and screen listings are
  dropped. Whitespace runs become one space; a line break between two Japanese characters is
  removed (it is not a word break).
- Paragraphs shorter than {min_en} characters (English) or {min_ja} (Japanese) are dropped unless
  they are headings; in the Japanese sources, paragraphs without any kana or kanji (untranslated
  English left in the Japanese editions) are dropped; repeated paragraphs within a source are
  kept once.
- Pages are cut into documents of about {max_doc} characters at paragraph boundaries, preferring
  headings; paragraphs are separated by a blank line.
- Jane Austen: the R data object (a character vector of lines) is decoded without R; one document
  per chapter, starting with its "Chapter N" line; lines of a paragraph are joined with spaces;
  the front matter (title, author) is dropped.
- Documents are written in an order shuffled with seed {shuffle_seed}, so that megatron's
  contiguous train/valid/test split draws each split from every source. There is no separate
  held-out file: the `split` setting (default 969,30,1) holds out the last 3.1% of documents.

## Tokenizer

`tokenizer.model` ({tokenizer_kb:.0f} kB): SentencePiece BPE, vocabulary {vocab_size}, trained
on every paragraph of the corpus, in corpus order (a few seconds on 2 cores), with these
`SentencePieceTrainer` settings:

```
{settings}
```

Regenerate it with `python -m stability.data.build_sample --tokenizer-only`; the result is
byte-identical.

`tokenizer-2k.model` (27 kB): the same recipe with a vocabulary of 2048, for CPU-scale studies
(`data.tokenizer=sample-2k`, `size=study`). Regenerate it with
`python -m stability.data.build_sample --tokenizer-only --vocab-size 2048`; the result is
byte-identical.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stability.data.build_sample")
    parser.add_argument("--tokenizer-only", action="store_true", help="retrain the tokenizer")
    parser.add_argument("--unpinned", action="store_true", help="take apt's current versions")
    parser.add_argument("--workdir", type=Path, help="keep downloads here (default: temporary)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    args = parser.parse_args(argv)

    if args.tokenizer_only:
        documents = list(iter_sample_documents())
        seconds = train_sample_tokenizer(documents, args.vocab_size)
        print(f"wrote the {args.vocab_size}-entry tokenizer in {seconds:.1f} s")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        roots = fetch_packages(SOURCES, workdir, pinned=not args.unpinned)
        versions = {name: package_version(name, workdir) for name in roots}
        documents = build_documents(roots)
    SAMPLE_DIR.mkdir(parents=True, exist_ok=True)
    write_corpus(documents, SAMPLE_CORPUS)
    seconds = train_sample_tokenizer(documents, args.vocab_size)
    stats = corpus_statistics(documents, Tokenizer(SAMPLE_TOKENIZER))
    write_provenance(stats, versions)
    print(
        f"wrote {SAMPLE_CORPUS} ({SAMPLE_CORPUS.stat().st_size / 1e6:.2f} MB), "
        f"{len(documents)} documents; tokenizer in {seconds:.1f} s"
    )
    for lang, row in sorted(stats["lang"].items()):
        print(
            f"  {lang}: {row['characters']:,} characters, {row['tokens']:,} tokens, "
            f"{row['characters'] / row['tokens']:.2f} characters/token, {row['unk']} unk"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
