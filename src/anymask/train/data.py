"""JSONL training data: read, validate (errors name the line), tokenize into examples.

One JSON object per line, UTF-8 (a leading byte-order mark is skipped); blank lines are skipped.
Fields per task::

    sft, prefix_lm   {"prompt": "...", "completion": "..."}
    embedding        {"query": "...", "positive": "..."}
    diffusion        {"text": "..."}

An :class:`Example` is one or more documents that must be packed together (an embedding pair is
two documents: query, then positive).  Every error is a :class:`DataError` that starts with
``path:line``.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass

FIELDS = {
    "sft": ("prompt", "completion"),
    "prefix_lm": ("prompt", "completion"),
    "embedding": ("query", "positive"),
    "diffusion": ("text",),
}


class DataError(ValueError):
    """Bad training data; the message starts with ``path:line``."""


@dataclass(frozen=True)
class Record:
    """One validated line: its 1-based line number and its text fields (in ``FIELDS`` order)."""

    line: int
    texts: tuple[str, ...]


@dataclass(frozen=True)
class Doc:
    """One document's token ids; its first ``prompt_len`` tokens are the prompt (or the query)."""

    ids: tuple[int, ...]
    prompt_len: int = 0


@dataclass(frozen=True)
class Example:
    """Documents packed as one unit (1, or 2 for an embedding pair); ``line`` for messages."""

    docs: tuple[Doc, ...]
    line: int

    def __len__(self) -> int:
        return sum(len(d.ids) for d in self.docs)


def read_records(path: str, task: str) -> list[Record]:
    """Parse and validate every line of ``path`` for ``task``; raise :class:`DataError` on the first bad one."""
    fields = FIELDS[task]
    out = []
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot read the data file ({exc.strerror})") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            if number == 1:
                line = line.removeprefix(codecs.BOM_UTF8)  # what some editors write first
            try:
                raw = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{number}: not UTF-8 text (byte {line[exc.start]:#04x} at column "
                                f"{exc.start + 1}); save the file as UTF-8") from None
            if not raw.strip():
                continue
            out.append(Record(number, _validate(path, number, raw, fields, task)))
    if not out:
        raise DataError(f"{path}: no examples (the file is empty)")
    return out


def fingerprint(path: str) -> dict:
    """``{"size", "sha256"}`` of the file at ``path``: checkpoints record it, so a resumed run can
    tell a data file edited in place (hashing costs far less than the parsing every run does)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _validate(path: str, number: int, raw: str, fields: tuple[str, ...], task: str) -> tuple[str, ...]:
    where = f"{path}:{number}"
    try:
        obj = json.loads(raw.rstrip("\r\n"))  # the line's end is not JSON: a column past it would read as 1
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with fields {', '.join(fields)}, "
                        f"got {type(obj).__name__}")
    missing = [f for f in fields if f not in obj]
    if missing:
        raise DataError(f"{where}: missing field{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(map(repr, missing))} (task {task} needs {', '.join(fields)}; "
                        f"the line has {', '.join(map(repr, obj)) or 'no fields'})")
    for f in fields:
        if not isinstance(obj[f], str):
            raise DataError(f"{where}: field {f!r} must be a string, got {type(obj[f]).__name__}")
        if not obj[f].strip():
            raise DataError(f"{where}: field {f!r} is empty")
        try:
            obj[f].encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON's \ud800 escapes allow half a surrogate pair: no tokenizer takes it
            raise DataError(f"{where}: field {f!r} holds an unpaired surrogate {obj[f][exc.start]!r} at character "
                            f"{exc.start + 1} (a broken \\uXXXX escape)") from None
    return tuple(obj[f] for f in fields)


def tokenize(records: list[Record], tokenizer, task: str, max_tokens: int, *, truncate: bool = False,
             path: str = "data") -> list[Example]:
    """Token ids per record.  An example longer than ``max_tokens`` (the packing length) is an
    error naming its line, unless ``truncate`` (then it is cut to fit: completions from the end,
    an embedding pair half the length per text, a short side leaving the rest to the other)."""
    if not records:
        return []
    columns = list(zip(*(r.texts for r in records)))
    eos = tokenizer.eos_token_id
    if eos is None and task != "embedding":  # every document ends with it
        raise DataError(f"the tokenizer has no EOS token, which ends each {task} document; set one "
                        "(tokenizer.eos_token = ..., saved with the tokenizer) or use a tokenizer that has it")
    if task in ("sft", "prefix_lm"):
        prompts = _encode(tokenizer, columns[0], special=True)
        completions = [ids + [eos] for ids in _encode(tokenizer, columns[1], special=False)]
        docs = [(_prompt_doc(p, c, max_tokens, truncate),) for p, c in zip(prompts, completions)]
    elif task == "embedding":
        queries = _encode(tokenizer, columns[0], special=True)
        positives = _encode(tokenizer, columns[1], special=True)
        docs = [_pair_docs(q, p, max_tokens, truncate) for q, p in zip(queries, positives)]
    else:
        texts = _encode(tokenizer, columns[0], special=True)
        docs = [(Doc(tuple((t + [eos])[:max_tokens] if truncate else t + [eos])),) for t in texts]
    out = []
    for record, ds in zip(records, docs):
        ex = Example(tuple(ds), record.line)
        if any(len(d.ids) == 0 for d in ex.docs):
            raise DataError(f"{path}:{record.line}: a field tokenizes to no tokens")
        if len(ex) > max_tokens:
            raise DataError(f"{path}:{record.line}: example has {len(ex)} tokens, more than the packing "
                            f"length {max_tokens} (raise --tokens-per-batch, or pass --truncate)")
        out.append(ex)
    return out


def _encode(tokenizer, texts, *, special: bool) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=special)["input_ids"]]


def _prompt_doc(prompt: list[int], completion: list[int], max_tokens: int, truncate: bool) -> Doc:
    """Prompt + completion; under ``truncate`` the completion is cut from its end, and a prompt that
    alone fills the length keeps its last tokens and one completion token."""
    if truncate and len(prompt) + len(completion) > max_tokens:
        if len(prompt) >= max_tokens:
            prompt = prompt[len(prompt) - (max_tokens - 1):]
        completion = completion[:max_tokens - len(prompt)]
    return Doc(tuple(prompt + completion), len(prompt))


def _pair_docs(query: list[int], positive: list[int], max_tokens: int, truncate: bool) -> tuple[Doc, Doc]:
    """An embedding pair: the query (all of it the prompt) and its positive; under ``truncate`` a pair
    longer than ``max_tokens`` gives each side half the length, and a side shorter than its half
    leaves the rest to the other (a 10-token query beside a long positive keeps 502 of 512)."""
    if truncate and len(query) + len(positive) > max_tokens:
        keep_q = min(len(query), max(max_tokens // 2, max_tokens - len(positive)))
        query, positive = query[:keep_q], positive[:max_tokens - keep_q]
    return Doc(tuple(query), len(query)), Doc(tuple(positive))
