"""Data loading, validation (line numbers), packing and sharding: no model involved."""

from __future__ import annotations

import pytest
import torch

from anymask.train import DataError
from anymask.train.data import Doc, Example, read_records, tokenize
from anymask.train.distributed import Dist
from anymask.train.packing import pack
from anymask.train.stream import Stream, local_shards, split

from .test_train_helpers import write_jsonl


class CharTokenizer:
    """A real-enough tokenizer for data tests: one id per character, eos = 0."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[1 + (ord(c) % 200) for c in t] for t in texts]}


GOOD = {"prompt": "abc", "completion": "de"}


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "abc", "completion": ', "invalid JSON"),
    ('{"prompt": "abc", "completion": "de"', r"invalid JSON \(Expecting ',' delimiter at column 37\)"),
    ('{"prompt": "a\\ud800b", "completion": "de"}', "field 'prompt' holds an unpaired surrogate"),
    ('["prompt", "completion"]', "expected a JSON object"),
    ('{"prompt": "abc"}', "missing field 'completion'"),
    ('{"prompt": "abc", "completion": "   "}', "field 'completion' is empty"),
    ('{"prompt": 3, "completion": "x"}', "field 'prompt' must be a string"),
])
def test_bad_lines_name_their_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", GOOD, line, GOOD])
    with pytest.raises(DataError, match=rf"d\.jsonl:4: .*{message}"):
        read_records(path, "sft")


def test_missing_fields_per_task(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"query": "q", "positive": "p"}, {"query": "q"}])
    with pytest.raises(DataError, match=r":2: missing field 'positive'"):
        read_records(path, "embedding")
    with pytest.raises(DataError, match=r":1: missing field 'text'"):
        read_records(path, "diffusion")


def test_empty_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="empty"):
        read_records(write_jsonl(tmp_path / "e.jsonl", [""]), "sft")
    with pytest.raises(DataError, match="cannot read"):
        read_records(str(tmp_path / "nope.jsonl"), "sft")


def test_utf8_byte_order_mark_is_skipped(tmp_path):
    """Some editors start UTF-8 files with a BOM: it is not part of the first line's JSON."""
    bom = "\ufeff".encode("utf-8")
    path = tmp_path / "bom.jsonl"
    path.write_bytes(bom + b'{"prompt": "abc", "completion": "de"}\n{"prompt": "x", "completion": "y"}\n')
    assert [r.texts for r in read_records(str(path), "sft")] == [("abc", "de"), ("x", "y")]
    path.write_bytes(bom + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bom.jsonl:1: not UTF-8 text \(byte 0xe9 at column 14\)"):
        read_records(str(path), "diffusion")


def test_too_long_needs_truncate(tmp_path):
    rows = [GOOD, {"prompt": "x" * 30, "completion": "y" * 30}]
    records = read_records(write_jsonl(tmp_path / "d.jsonl", rows), "sft")
    with pytest.raises(DataError, match=r"d\.jsonl:2: example has 61 tokens, more than the packing length 16"):
        tokenize(records, CharTokenizer(), "sft", 16, path=str(tmp_path / "d.jsonl"))
    out = tokenize(records, CharTokenizer(), "sft", 16, truncate=True)
    assert [len(e) for e in out] == [6, 16]
    assert out[1].docs[0].prompt_len == 15  # the prompt keeps its end, one completion token remains



def test_embedding_truncation_gives_a_short_side_s_room_to_the_other():
    from anymask.train.data import Record

    out = tokenize([Record(1, ("ab", "x" * 40)), Record(2, ("q" * 40, "x" * 40))], CharTokenizer(), "embedding", 16,
                   truncate=True)
    assert [[len(d.ids) for d in e.docs] for e in out] == [[2, 14], [8, 8]]


@pytest.mark.parametrize("task", ["sft", "prefix_lm", "diffusion"])
def test_a_tokenizer_without_eos_is_refused(task):
    from anymask.train.data import Record

    class NoEos(CharTokenizer):
        eos_token_id = None

    texts = ("ab",) if task == "diffusion" else ("ab", "cd")
    with pytest.raises(DataError, match="the tokenizer has no EOS token"):
        tokenize([Record(1, texts)], NoEos(), task, 64)
    assert tokenize([Record(1, ("ab", "cd"))], NoEos(), "embedding", 64)  # no EOS needed there

def test_tokenize_layouts():
    tok = CharTokenizer()
    from anymask.train.data import Record

    sft = tokenize([Record(1, ("ab", "cd"))], tok, "sft", 64)[0]
    assert sft.docs[0].prompt_len == 2 and sft.docs[0].ids[-1] == 0 and len(sft) == 5
    emb = tokenize([Record(1, ("ab", "cde"))], tok, "embedding", 64)[0]
    assert [len(d.ids) for d in emb.docs] == [2, 3]
    dif = tokenize([Record(1, ("abc",))], tok, "diffusion", 64)[0]
    assert len(dif.docs) == 1 and len(dif) == 4


def _examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = int(torch.randint(1, 3, (), generator=g))  # 1 or 2 documents
        docs = tuple(Doc(tuple(range(100 * i + 10 * j, 100 * i + 10 * j + int(torch.randint(1, 40, (), generator=g)))),
                         prompt_len=1) for j in range(k))
        out.append(Example(docs, i + 1))
    return out


def test_packing_keeps_every_token_and_resets_positions():
    examples = _examples(200)
    rows = pack(examples, 128, seed=3)
    assert all(r.num_tokens <= 128 for r in rows)
    total = sum(len(e) for e in examples)
    assert sum(r.num_tokens for r in rows) == total
    assert total / (128 * len(rows)) > 0.95  # rows come out nearly full
    seen = sorted(tuple(r.input_ids[0, r.doc_ids[0] == k].tolist()) for r in rows for k in range(len(r.doc_lengths)))
    assert seen == sorted(d.ids for e in examples for d in e.docs)
    for r in rows:
        starts = (r.position_ids[0] == 0).nonzero().squeeze(1).tolist()
        assert starts == [sum(r.doc_lengths[:k]) for k in range(len(r.doc_lengths))]
        assert torch.equal(r.doc_ids[0], torch.repeat_interleave(torch.arange(len(r.doc_lengths)),
                                                                 torch.tensor(r.doc_lengths)))


def test_pairs_stay_together_and_packing_is_deterministic():
    examples = _examples(100)
    a, b = pack(examples, 96, seed=1, epoch=2), pack(examples, 96, seed=1, epoch=2)
    assert [r.input_ids.tolist() for r in a] == [r.input_ids.tolist() for r in b]
    assert [r.seed for r in a] == [r.seed for r in b]
    c = pack(examples, 96, seed=1, epoch=3)
    assert [r.input_ids.tolist() for r in a] != [r.input_ids.tolist() for r in c]
    for r in a:  # a two-document example is packed as consecutive documents of one row
        ids = r.input_ids[0].tolist()
        for e in examples:
            if len(e.docs) == 2 and e.docs[0].ids[0] in ids:
                assert e.docs[1].ids[0] in ids


def test_same_microbatches_for_any_world_size():
    examples = _examples(120)
    one = Dist(0, 1, torch.device("cpu"), "none")
    single = Stream(split(examples, local_shards(2, one), 2), 96, 2, 0, one)
    ranks = [Dist(r, 2, torch.device("cpu"), "ddp") for r in range(2)]
    per_rank = [Stream(split(examples, local_shards(2, d), 2), 96, 1, 0, d) for d in ranks]
    for step in range(3):
        global_single = [b.input_ids.tolist() for b in single.step(0, step)]
        global_ranks = [b.input_ids.tolist() for s in per_rank for b in s.step(0, step)]
        assert global_single == global_ranks
