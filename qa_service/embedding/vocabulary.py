"""What a tokenizer's make-up tells the rest of the service: whether token counts add up, which words it holds."""

from __future__ import annotations

import json


def token_counts_add_up(tokenizer_config: str) -> bool:
    """Whether a tokenizer (its ``tokenizer.json`` text) counts two texts joined by whitespace as the sum of their
    counts, so that chunking may add sentence counts (docs/decisions/chunking-token-counts.md).

    True only for the BERT family's make-up, where it holds by construction: a WordPiece model after
    ``BertPreTokenizer``, at most a ``BertNormalizer``, and no added token holding whitespace (such a token is
    matched before words are split, and could span a join). Anything else answers False.
    """
    try:
        config = json.loads(tokenizer_config)
    except ValueError:
        return False
    normalizer = config.get("normalizer") or {"type": "BertNormalizer"}
    return ((config.get("model") or {}).get("type") == "WordPiece"
            and (config.get("pre_tokenizer") or {}).get("type") == "BertPreTokenizer"
            and normalizer.get("type") == "BertNormalizer"
            and not any(any(ch.isspace() for ch in t.get("content", "")) for t in config.get("added_tokens") or []))


def whole_words(tokens) -> frozenset[str]:
    """Return the lower-cased words a tokenizer holds whole (``"forums"``, not ``"##ums"`` or ``"[CLS]"``).

    Words a model reads as one token are common words of its language, which spelling correction leaves alone
    (docs/decisions/name-variants.md); WordPiece, SentencePiece "▁word" and byte-level BPE "Ġword" alike.
    """
    out = set()
    for token in tokens:
        if token.startswith("##"):
            continue
        word = token.lstrip("\u2581\u0120")
        if len(word) > 1 and word.isalpha():
            out.add(word.lower())
    return frozenset(out)
