"""The code normalizer: identifiers to one placeholder, comments and docstrings out,
keywords, operators and literals in; one lexer per language, words as the fallback."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

from agents.code_tokens import (
    IDENTIFIER,
    CodeDoc,
    code_tokens,
    lexer_for,
    word_tokens,
)
from agents.minhash import MinHasher

ID = IDENTIFIER
STDLIB = Path(sysconfig.get_paths()["stdlib"])

PYTHON = '''def area(width, height=2):
    """The area of a rectangle.

    Long docstring text that a copier may strip.
    """
    # multiply the sides
    result = width * height  # the product
    return round(result, 'int')
'''

PYTHON_COPY = '''def f(a, b = 2):
  r = a*b
  return round(r, "int")
'''


def tokens(text: str, language: str | None = None, source: str | None = None) -> list[str]:
    return code_tokens(CodeDoc(text, language, source))


# -- Python ----------------------------------------------------------------------------------


def test_python_names_comments_and_docstrings_are_normalized() -> None:
    assert tokens(PYTHON, "python") == [
        "def", ID, "(", ID, ",", ID, "=", "2", ")", ":",
        ID, "=", ID, "*", ID,
        "return", "round", "(", ID, ",", '"int"', ")"]


def test_python_renamed_stripped_reformatted_copy_is_the_same_stream() -> None:
    assert tokens(PYTHON_COPY, "python") == tokens(PYTHON, "python")


def test_python_literals_and_keywords_still_tell_files_apart() -> None:
    other = PYTHON.replace("height=2", "height=3").replace("return", "yield")
    assert tokens(other, "python") != tokens(PYTHON, "python")
    assert "3" in tokens(other, "python") and "yield" in tokens(other, "python")


def test_python_fstring_names_are_placeholders_and_text_kept() -> None:
    assert tokens('x = f"hi {name}!"\n', "python") == [
        ID, "=", 'f"hi ', "{", ID, "}", '!"']


def test_a_real_module_keeps_no_comment_or_docstring_text() -> None:
    text = (STDLIB / "textwrap.py").read_text(encoding="utf-8")
    stream = tokens(text, "python")
    assert len(stream) > 1000
    joined = " ".join(stream)
    assert "Text wrapping and filling" not in joined  # the module docstring
    assert "Copyright" not in joined  # a comment
    assert not any(t.startswith("#") for t in stream)
    assert stream.count(ID) > len(stream) // 5


# -- C and C++ -------------------------------------------------------------------------------


C_SOURCE = """#include <stdio.h>
/* Print a counter.
 * Block comment. */
static int count_items(int n) { // line comment
    printf("n=%d\\n", n);
    return n + 1;
}
"""


def test_c_comments_out_preprocessor_and_literals_in() -> None:
    assert tokens(C_SOURCE, "c") == [
        "#", "include", "<", "stdio", ".", "h", ">",
        "static", "int", ID, "(", "int", ID, ")", "{",
        ID, "(", '"n=%d\\n"', ",", ID, ")", ";",
        "return", ID, "+", "1", ";", "}"]


def test_c_header_lexer_from_the_file_extension() -> None:
    assert tokens(C_SOURCE, None, "/usr/include/example.h") == tokens(C_SOURCE, "c")


def test_cpp_rename_and_layout_do_not_change_the_stream() -> None:
    a = "template <typename T>\nstd::vector<T> keep(const std::vector<T>& xs) {\n" \
        "  // copy\n  return xs;\n}\n"
    b = "template<typename U> std::vector<U> take(const std::vector<U> &ys)\n{\n" \
        "    return ys;\n}\n"
    assert tokens(a, "cpp") == tokens(b, "cpp")
    assert "template" in tokens(a, "cpp") and "return" in tokens(a, "cpp")


# -- JavaScript ------------------------------------------------------------------------------


def test_javascript_jsdoc_out_quotes_unified_names_placeholders() -> None:
    a = "/** Greets. */\nfunction greet(name) {\n  return 'hi ' + name; // say hi\n}\n"
    b = 'function hello(who){return "hi "+who;}'
    assert tokens(a, "javascript") == tokens(b, "javascript") == [
        "function", ID, "(", ID, ")", "{", "return", '"hi "', "+", ID, ";", "}"]


def test_javascript_template_literal_keeps_its_text() -> None:
    stream = tokens("const s = `id=${id}`;", "javascript")
    assert stream[:3] == ["const", ID, "="]
    assert ID in stream[3:] and "`" not in "".join(stream)


# -- shell -----------------------------------------------------------------------------------


SHELL = """#!/bin/bash
# Copy the logs.
for f in *.log; do
    cp "$f" "$DEST/$f.bak"   # keep a backup
done
"""


def test_shell_comments_out_variables_placeholders_commands_kept() -> None:
    stream = tokens(SHELL, "shell")
    assert "#" not in stream and "Copy" not in stream and "backup" not in stream
    assert stream[:2] == ["for", "f"]  # pygments lexes a loop variable as a plain word
    assert "cp" in stream and "done" in stream
    renamed = SHELL.replace("$DEST", "$TARGET").replace("# keep a backup", "")
    assert tokens(renamed, "shell") == stream


# -- fallback and lexer choice ---------------------------------------------------------------


def test_unknown_language_falls_back_to_words() -> None:
    text = "Some Text, in a made-up language!"
    assert tokens(text, "klingon") == word_tokens(text) == [
        "some", "text", "in", "a", "made", "up", "language"]
    assert tokens(text) == word_tokens(text)
    assert tokens(text, None, "notes.unknownext") == word_tokens(text)


def test_lexer_choice() -> None:
    assert lexer_for("Python") is not None and lexer_for("python") is lexer_for("PYTHON")
    assert lexer_for(None, "src/app.js") is not None
    assert lexer_for("no-such-language", "a.py") is lexer_for(None, "b.py")
    assert lexer_for(None, "README") is None
    assert lexer_for(None, None) is None
    assert lexer_for(None, "x." + "y" * 40) is None


def test_malformed_code_is_tokenized_not_raised() -> None:
    for language in ("python", "c", "javascript", "shell"):
        stream = tokens('def (( "unterminated \x00 }}} /* ', language)
        assert stream and all(token for token in stream)
        assert not any("\x00" in token for token in stream)


def test_empty_text_has_no_tokens() -> None:
    assert tokens("", "python") == []
    assert tokens("# only a comment\n", "python") == []


# -- token shingles --------------------------------------------------------------------------


def test_token_shingles_hash_like_word_shingles() -> None:
    hasher = MinHasher(64, 5)
    text = (STDLIB / "textwrap.py").read_text(encoding="utf-8")
    words = word_tokens(text)
    assert np.array_equal(hasher.token_shingle_hashes(words), hasher.shingle_hashes(text))


def test_tokens_with_spaces_are_single_tokens() -> None:
    hasher = MinHasher(64, 2)
    assert not np.array_equal(hasher.token_shingle_hashes(['"a b"', "c"]),
                              hasher.token_shingle_hashes(['"a', 'b"', "c"]))
    assert len(hasher.token_shingle_hashes([])) == 0


def test_a_prefixed_docstring_goes_with_its_prefix() -> None:
    raw = 'def f(x):\n    r"""Raw \\d docstring."""\n    return x\n'
    assert tokens(raw, "python") == tokens('def f(x):\n    return x\n', "python")
    assert tokens('x = rb"\\d"\n', "python") == [ID, "=", 'rb"\\d"']
