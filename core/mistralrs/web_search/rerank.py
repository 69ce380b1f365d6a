"""Reranking search results before the model sees them (mistral.rs's pipeline): the pages are
cut into chunks, a BM25 keyword score keeps the best `BM25_TOP_K` chunks for the query, an
embedding model orders those by cosine similarity to the query, and the best chunks fill the
token budget. Without an embedding model, results are only trimmed to the budget."""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Callable

from mistralrs.web_search.results import SearchResult

CHUNK_WORDS = 300  # about 400 tokens of English; embedding models see up to max_seq_length of it
BM25_TOP_K = 20
_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def bm25_scores(query: str, docs: list[str], *, k1: float = 1.2, b: float = 0.75) -> list[float]:
    """Okapi BM25 of each doc for the query (IDF with the usual +1 smoothing, never negative)."""
    tokenized = [words(d) for d in docs]
    n = len(tokenized)
    if not n:
        return []
    avg = sum(len(t) for t in tokenized) / n or 1.0
    df: Counter[str] = Counter()
    for t in tokenized:
        df.update(set(t))
    terms = set(words(query))
    idf = {w: math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5)) for w in terms}
    scores = []
    for t in tokenized:
        tf = Counter(t)
        s = 0.0
        for w in terms:
            f = tf.get(w, 0)
            if f:
                s += idf[w] * f * (k1 + 1) / (f + k1 * (1 - b + b * len(t) / avg))
        scores.append(s)
    return scores


def chunks_of(result: SearchResult, index: int) -> list[tuple[int, str]]:
    """(result index, text) pieces of a page of about CHUNK_WORDS words each, with its title."""
    ws = result.content.split()
    if not ws:
        return [(index, f"{result.title}\n{result.description}")]
    return [(index, f"{result.title}\n" + " ".join(ws[i:i + CHUNK_WORDS])) for i in range(0, len(ws), CHUNK_WORDS)]


def rerank(query: str, results: list[SearchResult], embed: Callable[[list[str], list[str]], Any],
           fit: Callable[[str, int], tuple[str, int]], budget: int) -> list[SearchResult]:
    """Results holding their best chunks, best first, within `budget` tokens in all.
    `embed(query_texts, document_texts)` gives (query vectors, document vectors);
    `fit(text, tokens)` cuts a text to at most `tokens` and says how many it kept."""
    import torch

    chunks = [c for i, r in enumerate(results) for c in chunks_of(r, i)]
    if not chunks:
        return []
    scores = bm25_scores(query, [c[1] for c in chunks])
    top = sorted(range(len(chunks)), key=lambda i: -scores[i])[:BM25_TOP_K]
    q, docs = embed([query], [chunks[i][1] for i in top])
    sims = torch.nn.functional.cosine_similarity(q, docs, dim=-1).tolist()
    order = [top[i] for i in sorted(range(len(top)), key=lambda i: -sims[i])]
    picked: dict[int, list[str]] = {}
    left = budget
    for i in order:
        if left <= 0:
            break
        text, used = fit(chunks[i][1].split("\n", 1)[-1], left)
        left -= used
        picked.setdefault(chunks[i][0], []).append(text)
    return [SearchResult(results[i].title, results[i].description, results[i].url, "\n...\n".join(parts))
            for i, parts in picked.items()]
