"""A built-in offline prose corpus for long-context haystacks, cut from Python's own bundled documentation.

``pydoc_data.topics.topics`` ships with CPython (it backs ``help("if")``): about 80 topics of reference text,
~465K characters. :func:`sentences` keeps only its plain prose: paragraphs set flush with their context (code
samples and grammar rules are indented deeper, headings are underlined, both are dropped), split into
sentences, and only sentences that read as prose are kept (ASCII, 40–300 characters, starting with a capital
letter and ending with a full stop, no code punctuation, no numbers of 4+ digits, no word over 24 characters).
That leaves ~1,600 sentences, ~180K characters: ~40K tokens for a BPE tokenizer, ~180K for a byte-level one.
Callers that need more cycle through it.

The order is deterministic (topics sorted by name, sentences in reading order, first occurrence of a repeated
sentence kept), so the same Python version always gives the same corpus. The text follows the Python version's
documentation, so another CPython release may give slightly different haystacks.

:func:`vocabulary` lists the lowercase words of that prose (4–10 letters), for word-list tasks.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator

__all__ = ["sentences", "vocabulary"]

# Typographic characters of the docs, mapped to ASCII so that the corpus is ASCII throughout.
_TO_ASCII = str.maketrans(
    {
        "\u201c": '"',
        "\u201d": '"',
        "\u2018": "'",
        "\u2019": "'",
        "\u2013": "-",
        "\u2014": "-",
        "\u2026": "...",
        "\u00a0": " ",
    }
)
# A list marker at the start of a paragraph: "* ", "- ", "1. ", "(a) ".
_BULLET = re.compile(r"^(?:[*-]|\d+\.|\([a-z0-9]\))\s+")
# Heading underlines ("*****", "=====", "-----").
_UNDERLINE = set("*=-~^")
# Sentence ends: a full stop, question or exclamation mark, then a capital letter, a quote or a parenthesis.
_SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=[A-Z"(])')
# Abbreviations after which a split is undone.
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.")
# Anything that marks code, markup or data rather than prose.
_NOT_PROSE = re.compile(r"[=#{}\[\]|\\<>~^@$%`]|>>>|::|\d{4,}|\S{25,}|[^\x00-\x7f]")
# Sentences that are version notes or cross-references rather than prose.
_SKIP_PREFIXES = ("Changed in version", "Added in version", "New in version", "Deprecated since", "See also")


def _paragraphs(text: str) -> Iterator[list[str]]:
    """Blocks of consecutive non-blank lines."""
    block: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.strip():
            block.append(line)
        elif block:
            yield block
            block = []


def _prose_paragraph(block: list[str]) -> str | None:
    """The paragraph as one line of text, or None when it is a heading, code, a grammar rule or a table.

    Prose starts with a capital letter or a quote (after an optional list marker) and every continuation line
    is indented exactly as far as the text of the first line; code and grammar blocks break one of the two.
    """
    first = block[0]
    indent = len(first) - len(first.lstrip())
    body = first.lstrip()
    bullet = _BULLET.match(body)
    width = indent + (bullet.end() if bullet else 0)
    if bullet:
        body = body[bullet.end() :]
    if not body or not (body[0].isupper() or body[0] == '"'):
        return None
    if len(block) > 1 and set(block[1].strip()) <= _UNDERLINE:
        return None  # a heading
    text = body
    for line in block[1:]:
        if len(line) - len(line.lstrip()) != width:
            return None
        # A word hyphenated across a line break ("built-" / "in") is joined without a space.
        text += ("" if re.search(r"[A-Za-z]-$", text) else " ") + line.strip()
    return text


def _split_sentences(paragraph: str) -> list[str]:
    merged: list[str] = []
    for piece in _SENTENCE_END.split(paragraph):
        if merged and merged[-1].endswith(_ABBREVIATIONS):
            merged[-1] += " " + piece
        else:
            merged.append(piece)
    return merged


def _is_prose(sentence: str) -> bool:
    return (
        40 <= len(sentence) <= 300
        and sentence[0].isupper()
        and sentence.endswith(".")
        and not sentence.startswith(_SKIP_PREFIXES)
        and _NOT_PROSE.search(sentence) is None
    )


@functools.cache
def sentences() -> tuple[str, ...]:
    """The corpus: plain prose sentences from Python's bundled documentation, in a fixed order (cached).

    Every sentence is ASCII, ends with ``.``, and is separated from the next by a single space when joined.
    """
    from pydoc_data.topics import topics  # stdlib, ~0.5 MB: imported on first use only

    out: list[str] = []
    seen: set[str] = set()
    for name in sorted(topics):
        for block in _paragraphs(topics[name].translate(_TO_ASCII)):
            paragraph = _prose_paragraph(block)
            if paragraph is None:
                continue
            paragraph = re.sub(r"\s+", " ", paragraph)
            paragraph = re.sub(r"(?<![\w\"'*])\*(\w[^*\"]*?)\*(?![\w\"'*])", r"\1", paragraph)  # *emphasis*
            paragraph = re.sub(r"^(?:Note|Warning|Tip|Important): ", "", paragraph)
            for sentence in _split_sentences(paragraph):
                if _is_prose(sentence) and sentence not in seen:
                    seen.add(sentence)
                    out.append(sentence)
    return tuple(out)


@functools.cache
def vocabulary() -> tuple[str, ...]:
    """Distinct all-lowercase words of 4–10 letters from :func:`sentences`, sorted (cached)."""
    words = {w for s in sentences() for w in re.findall(r"(?<![\w'\"-])[a-z]{4,10}(?![\w'\"-])", s)}
    return tuple(sorted(words))
