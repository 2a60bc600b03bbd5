"""Training data for `fastcache train`: (query, positive[, negative]) rows from a built-in offline corpus, a Hugging
Face dataset or a local jsonl/csv/parquet file, checked row by row, split into training rows and a held-out
retrieval evaluation (queries, corpus, relevant documents) for sentence-transformers' InformationRetrievalEvaluator.
"""

from __future__ import annotations

import codecs
import importlib
import inspect
import random
import sys
from dataclasses import dataclass
from pathlib import Path

STDLIB_MODULES = ("json", "os", "collections", "itertools", "functools", "re", "string", "textwrap", "pathlib",
                  "statistics", "datetime", "random", "argparse", "logging", "subprocess", "shutil", "csv",
                  "tarfile", "zipfile", "heapq", "bisect", "fractions", "decimal", "difflib", "email.message",
                  "urllib.parse", "http.client", "unittest", "threading", "asyncio.tasks")
BUILTIN = "docstrings"  # the name of the built-in corpus as a --dataset value
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """Unusable training data (unknown source, missing column, malformed row); the message says which and why."""


def _from_stdlib(obj) -> bool:
    """Whether ``obj`` is defined by the standard library (or by C code without a module): packages patch methods
    into some of its classes once imported (transformers adds ``logging.Logger.warning_once``)."""
    module = getattr(obj, "__module__", None)
    return module is None or module.split(".")[0] in sys.stdlib_module_names


def _documented(module) -> list:
    """The module's public callables in name order, each class followed by its public methods (name order); only
    what the standard library defines, so that the corpus does not depend on what else was imported."""
    found = []
    for name, obj in sorted(inspect.getmembers(module), key=lambda item: item[0]):
        if name.startswith("_") or not callable(obj) or not _from_stdlib(obj):
            continue
        found.append(obj)
        if inspect.isclass(obj):
            found += [member for key, member in sorted(vars(obj).items())
                      if not key.startswith("_") and callable(member) and _from_stdlib(member)]
    return found


def docstring_pairs(limit: int, *, methods: bool = False) -> tuple[list[str], list[str]]:
    """(query, passage) pairs from Python's own documentation: a docstring's summary line is the query, the rest of
    the docstring (whitespace collapsed, cut at 400 characters) the passage. Deterministic, no download.
    ``methods``: also the public methods of the modules' classes (about twice the pairs)."""
    queries, passages, seen = [], [], set()
    for module_name in STDLIB_MODULES:
        module = importlib.import_module(module_name)
        members = _documented(module) if methods else [obj for _, obj in sorted(inspect.getmembers(module),
                                                                                 key=lambda item: item[0])]
        for obj in members:
            doc = inspect.getdoc(obj) if callable(obj) else None
            if not doc or "\n\n" not in doc:
                continue
            summary, rest = doc.split("\n\n", 1)
            summary, rest = " ".join(summary.split()), " ".join(rest.split())[:400]
            if len(summary) < 15 or len(rest) < 40 or summary in seen:
                continue
            seen.add(summary)
            queries.append(summary)
            passages.append(rest)
            if len(queries) == limit:
                return queries, passages
    return queries, passages


@dataclass
class Columns:
    """The source's column names for the query, its positive passage and (optionally) a hard negative."""

    query: str = "anchor"
    positive: str = "positive"
    negative: str | None = None


def _check_text(path: Path, source: str, kind: str) -> None:
    """A local file is not empty, and a text format (json, csv) is UTF-8 and not only whitespace (read in blocks:
    the parsers decode rows lazily, so a bad byte would otherwise surface as a traceback in the row checks)."""
    if path.stat().st_size == 0:
        raise DataError(f"--dataset {source!r}: the file is empty")
    if kind == "parquet":
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line, blank = 0, 1, True
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            pending = decoder.getstate()[0]  # the start of a character cut by the previous block (no newline)
            try:
                decoder.decode(block)
            except UnicodeDecodeError as error:
                seen = pending + block
                line += seen[:error.start].count(b"\n")
                raise DataError(f"--dataset {source!r}: not UTF-8 text (byte {seen[error.start]:#04x} at offset "
                                f"{offset - len(pending) + error.start}, line {line}); save it as UTF-8") from None
            offset += len(block)
            line += block.count(b"\n")
            blank = blank and not block.strip()
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"--dataset {source!r}: not UTF-8 text (it ends inside a character); save it as "
                            "UTF-8") from None
    if blank:
        raise DataError(f"--dataset {source!r}: the file holds only whitespace, no rows")


def _load_rows(source: str, split: str):
    """A ``datasets.Dataset`` from a local jsonl/json/csv/parquet path or a Hugging Face dataset name."""
    path = Path(source)
    if path.suffix.lower() in LOCAL_FORMATS or path.exists():
        if not path.is_file():
            raise DataError(f"--dataset {source!r}: " + ("not a file" if path.exists() else "no such file"))
        kind = LOCAL_FORMATS.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"--dataset {source!r}: unknown file type {path.suffix!r}; expected one of "
                            f"{', '.join(LOCAL_FORMATS)}")
        _check_text(path, source, kind)
    import datasets

    if path.is_file():
        try:
            table = datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as error:  # noqa: BLE001 - a parser error of any kind is one message
            raise DataError(f"--dataset {source!r}: could not read it as {kind}: "
                            f"{type(error).__name__}: {error}") from error
        if len(table) == 0:
            raise DataError(f"--dataset {source!r}: no rows in it")
        return table
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as error:  # noqa: BLE001 - offline, unknown name, unknown split: one message
        raise DataError(f"--dataset {source!r}: not a local file, and loading it as a Hugging Face dataset (split "
                        f"{split!r}) failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                        " (is the name right, and is the Hub reachable? HF_HUB_OFFLINE=1 forbids downloads)"
                        ) from error


def _checked(rows, source: str, columns: Columns) -> list[tuple[str, ...]]:
    """Rows as tuples (query, positive[, negative]) of non-empty strings; a missing column or a bad row raises."""
    wanted = [columns.query, columns.positive] + ([columns.negative] if columns.negative else [])
    missing = [name for name in wanted if name not in rows.column_names]
    if missing:
        raise DataError(f"--dataset {source!r} has no column {', '.join(map(repr, missing))} (its columns: "
                        f"{', '.join(rows.column_names)}); name them with --query-column / --positive-column / "
                        "--negative-column")
    checked = []
    for index, row in enumerate(rows.select_columns(wanted)):
        values = tuple(row[name] for name in wanted)
        for name, value in zip(wanted, values):
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"--dataset {source!r}: row {index}, column {name!r} is {value!r}; expected a "
                                "non-empty string")
        checked.append(values)
    return checked


def load_pairs(source: str = BUILTIN, *, columns: Columns | None = None, split: str = "train",
               limit: int | None = None) -> tuple[list[tuple[str, ...]], dict]:
    """Rows (query, positive[, negative]) from ``source`` (:data:`BUILTIN`, a local file or a Hub name), at most
    ``limit``, and a description of the source for the run summary."""
    if source == BUILTIN:
        queries, passages = docstring_pairs(limit or 10**6, methods=True)
        rows = list(zip(queries, passages))
        return rows, {"source": "Python standard library docstrings (summary line -> rest)", "rows": len(rows)}
    columns = columns or Columns()
    table = _load_rows(source, split)
    if limit is not None:
        table = table.select(range(min(limit, len(table))))
    rows = _checked(table, source, columns)
    return rows, {"source": source, "split": split, "columns": vars(columns), "rows": len(rows)}


@dataclass
class RetrievalSplit:
    """Training rows and a held-out retrieval task: ids to query text, ids to passage text, query id -> ids of its
    relevant passages. The corpus holds every distinct positive (training ones too: distractors) and negative."""

    train: list[tuple[str, ...]]
    queries: dict[str, str]
    corpus: dict[str, str]
    relevant: dict[str, set[str]]


def split_for_retrieval(rows: list[tuple[str, ...]], eval_size: int, seed: int = 0) -> RetrievalSplit:
    """Shuffle ``rows`` (seeded) and hold out ``eval_size`` distinct queries for evaluation; a held-out query's
    other rows (same query text) are held out too, so it is never trained on."""
    if eval_size < 1:
        raise DataError(f"--eval-size must be at least 1, got {eval_size}")
    distinct_queries = list(dict.fromkeys(row[0] for row in rows))
    if len(distinct_queries) < eval_size + 2:
        raise DataError(f"{len(rows)} rows with {len(distinct_queries)} distinct queries: too few for "
                        f"--eval-size {eval_size} held-out queries and at least 2 training rows")
    random.Random(seed).shuffle(distinct_queries)
    held_out = set(distinct_queries[:eval_size])
    corpus_ids: dict[str, str] = {}
    for row in rows:
        for passage in row[1:]:
            corpus_ids.setdefault(passage, f"d{len(corpus_ids)}")
    query_ids = {text: f"q{i}" for i, text in enumerate(sorted(held_out))}
    relevant: dict[str, set[str]] = {}
    for row in rows:
        if row[0] in held_out:
            relevant.setdefault(query_ids[row[0]], set()).add(corpus_ids[row[1]])
    train = [row for row in rows if row[0] not in held_out]
    random.Random(seed + 1).shuffle(train)
    return RetrievalSplit(train=train, queries={qid: text for text, qid in query_ids.items()},
                          corpus={cid: text for text, cid in corpus_ids.items()}, relevant=relevant)
