"""Search backends for the ``search`` tool.

* ``SearchIndex`` — offline full-text search (SQLite FTS5 from the standard library, BM25 ranking) over
  a folder of ``.txt``/``.md`` files (split into passages at blank lines) and ``.jsonl`` files (one
  document per row: ``text`` and optional ``title``). A small corpus ships with the package for tests
  and the demo (``default_corpus()``).
* ``HttpSearch`` — an HTTP endpoint given by URL. Request: ``POST`` JSON ``{"query": str, "k": int}``;
  response: JSON ``{"results": [{"title": str, "text": str}, ...]}``, best first.
"""

from __future__ import annotations

import json
import re
import sqlite3
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from recursivemas.errors import ConfigError, InputError

SNIPPET_CHARS = 320
_WORD_RE = re.compile(r"\w+")
_STOPWORDS = frozenset(
    """a an and are as at be by do does for from how in is it of on or that the this to was what when where
    which who why with""".split()  # noqa: SIM905 - one readable line of words
)


@dataclass(frozen=True)
class Hit:
    """One search result: where it came from and a snippet of at most ``SNIPPET_CHARS`` characters."""

    title: str
    text: str


def default_corpus() -> Path:
    """The folder of the small shipped corpus (a few encyclopedia-style notes)."""
    return Path(__file__).parent / "corpus"


class SearchIndex:
    """An in-memory SQLite FTS5 index of passages; ``search`` ranks them by BM25."""

    def __init__(self, passages: list[Hit]) -> None:
        if not passages:
            raise InputError("a search index needs at least one passage")
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute(
            "CREATE VIRTUAL TABLE passages USING fts5(title, text, tokenize = 'porter unicode61')"
        )
        self._db.executemany("INSERT INTO passages VALUES (?, ?)", [(p.title, p.text) for p in passages])
        self.size = len(passages)

    @classmethod
    def from_folder(cls, folder: str | Path) -> SearchIndex:
        """Index every ``.txt``, ``.md`` and ``.jsonl`` file under ``folder`` (recursively)."""
        root = Path(folder)
        if not root.is_dir():
            raise ConfigError(f"search corpus {root} is not a folder; give a folder of .txt/.md/.jsonl files")
        passages: list[Hit] = []
        for path in sorted(root.rglob("*")):
            if path.suffix in (".txt", ".md"):
                passages += _text_passages(path)
            elif path.suffix == ".jsonl":
                passages += _jsonl_passages(path)
        if not passages:
            raise ConfigError(f"search corpus {root} holds no .txt, .md or .jsonl documents")
        return cls(passages)

    def search(self, query: str, k: int = 4) -> list[Hit]:
        """The ``k`` best passages for any of ``query``'s words but common function words (BM25, Porter
        stemming), snippets cut to size."""
        words = [w for w in _WORD_RE.findall(query.lower()) if w not in _STOPWORDS]
        if not words:
            return []
        match = " OR ".join(f'"{w}"' for w in dict.fromkeys(words))
        rows = self._db.execute(
            "SELECT title, text FROM passages WHERE passages MATCH ? ORDER BY bm25(passages) LIMIT ?",
            (match, k),
        ).fetchall()
        return [Hit(title, _snippet(text)) for title, text in rows]


class HttpSearch:
    """A search endpoint at ``url`` (see the module docstring for the JSON shapes)."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"search URL {url!r} must start with http:// or https://")
        self.url, self.timeout_s = url, timeout_s

    def search(self, query: str, k: int = 4) -> list[Hit]:
        body = json.dumps({"query": query, "k": k}).encode()
        request = urllib.request.Request(self.url, body, {"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            payload = json.loads(response.read())
        try:
            return [Hit(str(r.get("title", "")), _snippet(str(r["text"]))) for r in payload["results"][:k]]
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(
                f"the search endpoint answered {str(payload)[:200]!r}, not {{'results': [...]}}"
            ) from err


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 3].rstrip() + "..."


def _text_passages(path: Path) -> list[Hit]:
    title = path.stem.replace("_", " ").replace("-", " ")
    blocks = [b.strip() for b in re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))]
    return [Hit(title, b.lstrip("# ")) for b in blocks if b and not b.startswith("# ")]


def _jsonl_passages(path: Path) -> list[Hit]:
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append(Hit(str(row.get("title", path.stem)), str(row["text"])))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise InputError(f"{path}:{i}: a corpus row must be JSON with a 'text' field ({err})") from None
    return out
