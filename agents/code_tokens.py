"""Identifier-normalized token streams of source code: what the code fuzzy layer shingles.

The classic code-clone normalization (SourcererCC, NiCad's blind renaming): lex the file
with a real lexer for its language, drop comments, docstrings and whitespace, turn every
identifier into one placeholder, and keep keywords, operators, punctuation and literals.
Two files that differ only in names, comments, docstrings, layout or quote style then give
the same token stream, and reordered definitions share almost all of their shingles.

The lexer comes from the record's language (``streams.sources`` names: ``python``, ``c``,
``shell``…), else from its source's file extension; with neither, the text falls back to
lower-cased word tokens (what the word layer sees), so every record gets a stream. Pygments
never raises on malformed input (it yields error tokens), so neither does this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import PurePosixPath

from pygments.lexer import Lexer
from pygments.lexers import find_lexer_class_for_filename, get_lexer_by_name
from pygments.token import (
    Comment,
    Keyword,
    Name,
    Number,
    String,
    _TokenType,
)
from pygments.util import ClassNotFound

#: Bump when the normalization changes: signatures stored under the old one stop comparing.
CODE_TOKENIZER = "pygments-idnorm/v1"

IDENTIFIER = "\x01id"  # the placeholder: cannot collide with a keyword or a literal's text
_STRING = '"'  # every quote character of a literal becomes this one
_QUOTES = str.maketrans({"'": _STRING, "`": _STRING})
_WORD = re.compile(r"\w+")
_PIECE = re.compile(r"\w+|[^\w\s]")
_MAX_SUFFIX = 16  # longer "extensions" are not file types: no lexer lookup for them


@dataclass(frozen=True, slots=True)
class CodeDoc:
    """What the code layer needs of a record: its content, language and source."""

    text: str
    language: str | None = None
    source: str | None = None


@lru_cache(maxsize=256)
def _lexer_by_name(name: str) -> Lexer | None:
    try:
        # stripnl off: leading blank lines are layout, dropped below like all whitespace.
        return get_lexer_by_name(name, stripnl=False)
    except ClassNotFound:
        return None


@lru_cache(maxsize=256)
def _lexer_by_suffix(suffix: str) -> Lexer | None:
    # By file name only: content-based guessing is slow and unreliable on short files.
    cls = find_lexer_class_for_filename(f"file{suffix}")
    return cls(stripnl=False) if cls is not None else None


def lexer_for(language: str | None, source: str | None = None) -> Lexer | None:
    """The pygments lexer of ``language`` (a name or alias, any case), else the one of
    ``source``'s file extension; None when neither names a known language."""
    if language:
        lexer = _lexer_by_name(language.strip().lower())
        if lexer is not None:
            return lexer
    if source:
        suffix = PurePosixPath(source.replace("\\", "/")).suffix.lower()
        if 1 < len(suffix) <= _MAX_SUFFIX:
            return _lexer_by_suffix(suffix)
    return None


def word_tokens(text: str) -> list[str]:
    """The fallback stream: lower-cased ``\\w+`` runs (the word layer's tokens)."""
    return _WORD.findall(text.lower())


def _dropped(kind: _TokenType) -> bool:
    """Comments (not preprocessor lines, which pygments also files under Comment) and
    docstrings are not the code: a copy that strips or rewrites them is still a copy."""
    if kind in Comment:
        return not (kind in Comment.Preproc or kind in Comment.PreprocFile)
    return kind in String.Doc


def _is_identifier(kind: _TokenType) -> bool:
    # Builtins (print, len, echo, cd) are the language's vocabulary, not names a copier
    # renames: keeping them makes distinct files less alike.
    return kind in Name and kind not in Name.Builtin


# What the normalization does with a token type, decided once per type: pygments' ``in``
# walks the type hierarchy in Python, and was a fifth of the time per file.
_LITERAL, _AFFIX, _DOC, _DROP, _IDENT, _LOWER, _PIECES = range(7)


@lru_cache(maxsize=1024)  # pygments' token types: a few hundred at most
def _category(kind: _TokenType) -> int:
    if kind in String and kind not in String.Doc and kind not in String.Interpol:
        return _AFFIX if kind in String.Affix else _LITERAL
    if kind in String.Doc:
        return _DOC
    if _dropped(kind):
        return _DROP
    if _is_identifier(kind):
        return _IDENT
    if kind in Keyword or kind in Number:
        return _LOWER
    return _PIECES


def normalize_tokens(text: str, lexer: Lexer) -> list[str]:
    """``text`` lexed by ``lexer`` into the normalized stream: identifiers as one
    placeholder, comments, docstrings and whitespace out, a run of string pieces as one
    literal (quotes unified), keywords lower-cased, operators and punctuation one character
    at a time (so layout never decides how they group)."""
    out: list[str] = []
    literal: list[str] = []
    affix_only = False  # the pending literal is only a prefix (r, b, f…) so far
    for kind, value in lexer.get_tokens(text):
        category = _category(kind)
        if category <= _AFFIX:
            affix_only = (affix_only or not literal) and category == _AFFIX
            literal.append(value)
            continue
        if category == _DOC and affix_only:
            literal.clear()  # r"""…""": the prefix belongs to the docstring
        if literal:
            out.append("".join(literal).translate(_QUOTES))
            literal.clear()
        if category <= _DROP or not value.strip():
            continue
        if category == _IDENT:
            out.append(IDENTIFIER)
        elif category == _LOWER:
            out.append(value.strip().lower())
        else:
            # Operators and punctuation one character at a time; Text, Error, Generic,
            # Other (pygments puts bare words there for some languages: shell arguments)
            # as their words and symbols.
            out.extend(_PIECE.findall(value))
    if literal:
        out.append("".join(literal).translate(_QUOTES))
    return [token.replace("\x00", "\\0") for token in out]


def code_tokens(doc: CodeDoc) -> list[str]:
    """The normalized token stream of ``doc``: lexed for its language when one fits, else
    its word tokens."""
    lexer = lexer_for(doc.language, doc.source)
    if lexer is None:
        return word_tokens(doc.text)
    return normalize_tokens(doc.text, lexer)

