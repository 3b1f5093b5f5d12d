"""What a fuzzy index shingles: its two configurations.

``WORDS`` shingles every record's words (the ``fuzzy`` layer); ``CODE_TOKENS`` shingles
CODE records' identifier-normalized token streams (``agents.code_tokens``; the
``fuzzy.code`` layer), under its own key prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from agents.code_tokens import CODE_TOKENIZER, CodeDoc, code_tokens
from agents.keys import code_lsh_prefix, lsh_prefix
from agents.minhash import TOKENIZER, MinHasher


def _words(hasher: MinHasher, doc: str | CodeDoc) -> np.ndarray:
    return hasher.shingle_hashes(doc.text if isinstance(doc, CodeDoc) else doc)


def _code(hasher: MinHasher, doc: str | CodeDoc) -> np.ndarray:
    tokens = code_tokens(doc if isinstance(doc, CodeDoc) else CodeDoc(doc))
    if len(tokens) < hasher.shingle_words:
        # Not one whole shingle of code (a file of comments, docs or a licence around a
        # `package x` line): all such files look alike here. The word layer still applies.
        return np.empty(0, dtype=np.uint32)
    return hasher.token_shingle_hashes(tokens)


@dataclass(frozen=True, slots=True)
class Shingling:
    """What an index shingles: one of its two configurations.

    ``method`` is what a rejection names; ``tokenizer`` goes into the index's ``scheme`` (an
    index built with another one is refused); ``size_field`` is the meta field of the
    shingle size; ``prefix`` gives the keys of a namespace's index; ``hashes`` turns a
    document (a text, or a ``CodeDoc``) into its shingle hashes.
    """

    method: str
    tokenizer: str
    size_field: str
    prefix: Callable[[str], str]
    hashes: Callable[[MinHasher, str | CodeDoc], np.ndarray]


WORDS = Shingling("words", TOKENIZER, "shingle_words", lsh_prefix, _words)
CODE_TOKENS = Shingling("code-tokens", CODE_TOKENIZER, "shingle_tokens", code_lsh_prefix,
                        _code)
