"""Text clean-up that keeps a creator's style: emoji, hashtags, casing and line breaks survive;
control characters and stray whitespace do not."""

from __future__ import annotations

import re
import unicodedata

HASHTAG_RE = re.compile(r"(?<![\w&/])#(\w+)")
_TRAILING_SPACE_RE = re.compile(r"[ \t\u00a0]+\n")
_BLANK_LINES_RE = re.compile(r"\n{3,}")
_WS_RE = re.compile(r"\s+")
_EDGE_PUNCT = " \t\n.,!?;:-–—…~*'\"()[]"


def normalize_text(text: str) -> str:
    # NFC, not NFKC: compatibility folding would turn stylised letters (𝓯𝓪𝓷𝓬𝔂) into plain ones.
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    out = []
    for ch in text:
        if ch == "\n":
            out.append(ch)
        elif ch == "\t":
            out.append(" ")
        elif unicodedata.category(ch) == "Cc":
            continue  # NUL, BEL, ESC... (format chars like ZWJ stay: emoji sequences need them)
        else:
            out.append(ch)
    text = _TRAILING_SPACE_RE.sub("\n", "".join(out))
    return _BLANK_LINES_RE.sub("\n\n", text).strip()


def extract_hashtags(text: str) -> list[str]:
    return HASHTAG_RE.findall(text)


def merge_hashtags(*groups: list[str]) -> list[str]:
    """Union in first-seen order, case-insensitively (#OOTD and #ootd are one tag)."""
    seen, out = set(), []
    for group in groups:
        for tag in group:
            tag = tag.strip().lstrip("#").strip()
            if tag and tag.casefold() not in seen:
                seen.add(tag.casefold())
                out.append(tag)
    return out


def dedupe_key(text: str) -> str:
    """Two posts whose keys match are 'normalised duplicates': same words modulo case,
    width variants, spacing and edge punctuation."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return _WS_RE.sub(" ", folded).strip(_EDGE_PUNCT)


def has_surrogates(text: str) -> bool:
    """Bytes that were not UTF-8 survive decoding (surrogateescape) as lone surrogates."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)
