"""The measured-choice cache: round trip, corrupt files, concurrent writers, eligibility, autotune."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import anymask
from anymask import backend as B
from anymask import masks as M
from anymask import tuning
from anymask.problem import describe

SRC = str(Path(anymask.__file__).resolve().parents[1])


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYMASK_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ANYMASK_AUTOTUNE", raising=False)
    tuning.reload()
    yield tmp_path
    tuning.reload()


def problem(mask=None, seq=32, grad=False, dtype=torch.float32):
    mask = mask if mask is not None else M.causal()
    q = torch.randn(2, 4, seq, 16, dtype=dtype, requires_grad=grad)
    k = torch.randn(2, 2, seq, 16, dtype=dtype, requires_grad=grad)
    v = torch.randn(2, 2, seq, 16, dtype=dtype, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        return describe(q, k, v, mask, None), (q, k, v)


def test_signature_is_bucketed_and_readable():
    p, _ = problem(M.documents(lengths=[8, 8, 16]) & M.causal(), seq=32)
    sig = tuning.signature(p)
    assert sig.startswith("documents+causal|q32|kv32|hd16|gqa2|float32|nograd|d")
    p2, _ = problem(M.documents(lengths=[8, 8, 14]) & M.causal(), seq=30)  # rounds to 32
    assert tuning.shape_signature(p2) == tuning.shape_signature(p)
    assert tuning.density_bucket(1.0) == "1" and tuning.density_bucket(0.26) == "1/4"
    assert tuning.density_bucket(0.0) == "0"


def test_round_trip(cache_dir):
    p, _ = problem()
    assert tuning.lookup(p) is None
    tuning.remember(p, {"backend": "eager", "ms": {"eager": 1.0}})
    assert tuning.lookup(p) == "eager"
    tuning.reload()  # a new process: read from the file
    assert tuning.lookup(p) == "eager"
    doc = json.loads((cache_dir / "choices.json").read_text())
    assert doc["format"] == tuning.FORMAT
    [(machine, entries)] = doc["machines"].items()
    assert "torch " + torch.__version__ in machine and "triton" in machine
    assert entries[tuning.signature(p)]["backend"] == "eager"
    p_grad, inputs = problem(grad=True)
    assert tuning.lookup(p_grad) is None  # gradients are part of the signature
    with torch.no_grad():
        assert anymask.which_backend(*(t.detach() for t in inputs), M.causal()) == "eager"  # dispatch uses it


def test_lookup_without_entries_reads_no_tensor(monkeypatch):
    p, _ = problem()
    monkeypatch.setattr(tuning, "density", lambda p: pytest.fail("density computed on a miss"))
    assert tuning.lookup(p) is None


def test_corrupt_file_warns_and_is_ignored(cache_dir):
    path = cache_dir / "choices.json"
    path.write_text("{ this is not json")
    p, _ = problem()
    with pytest.warns(UserWarning, match="corrupt"):
        assert tuning.lookup(p) is None
    with pytest.warns(UserWarning, match="corrupt"):
        tuning.remember(p, {"backend": "sdpa"})
    assert (cache_dir / "choices.json.corrupt").read_text() == "{ this is not json"
    tuning.reload()
    assert tuning.lookup(p) == "sdpa"



def test_a_malformed_entry_is_skipped_and_the_rest_kept(cache_dir):
    """A hand edit or another version's entry is skipped (and kept in the file), not every machine's choices."""
    p, _ = problem()
    tuning.remember(p, {"backend": "sdpa"})
    path = cache_dir / "choices.json"
    data = json.loads(path.read_text())
    data["machines"]["other-gpu"] = {"sig": {"backend": None}, "good": {"backend": "cudnn"}}
    data["machines"]["broken"] = ["not", "a", "dict"]
    path.write_text(json.dumps(data))
    tuning.reload()
    with pytest.warns(UserWarning, match="skipping 2 tuning cache entries it cannot use"):
        assert tuning.lookup(p) == "sdpa"
    tuning.remember(problem(M.full())[0], {"backend": "eager"})
    kept = json.loads(path.read_text())["machines"]  # written back as read: another version may use them
    assert kept["other-gpu"] == data["machines"]["other-gpu"] and kept["broken"] == ["not", "a", "dict"]
    assert tuning.entries("cpu") and not (cache_dir / "choices.json.corrupt").exists()


def test_an_unwritable_cache_keeps_the_choice_in_memory(cache_dir, monkeypatch):
    blocker = cache_dir / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("ANYMASK_CACHE_DIR", str(blocker / "cache"))  # its parent is a file
    tuning.reload()
    p, _ = problem()
    with pytest.warns(UserWarning, match="cannot save the tuning cache"):
        tuning.remember(p, {"backend": "sdpa"})
    assert tuning.lookup(p) == "sdpa"


def test_a_measurement_short_of_memory_is_not_kept(monkeypatch, cache_dir):
    """Out of memory only while measuring (three input sets and a float64 reference) is no verdict
    on a backend: nothing is stored, and this process does not measure the signature again."""
    from anymask.bench import choose

    monkeypatch.setenv("ANYMASK_AUTOTUNE", "1")
    calls = []
    real = choose.measure_problem

    def short_of_memory(p, **kw):
        calls.append(1)
        choice = real(p, **kw)
        loser = next(n for n in choice.ms if n != choice.winner)
        choice.rejected[loser] = "out of memory"
        return choice

    monkeypatch.setattr(choose, "measure_problem", short_of_memory)
    mask = M.window(6) & M.causal()
    p, (q, k, v) = problem(mask, seq=24)
    with pytest.warns(UserWarning, match="ran out of memory while measuring; nothing stored"):
        out = anymask.attention(q, k, v, M.window(6) & M.causal())
    torch.testing.assert_close(out, anymask.attention(q, k, v, mask, backend="eager"))
    anymask.attention(q, k, v, M.window(6) & M.causal())  # a new mask: not measured again
    assert len(calls) == 1 and tuning.entries("cpu") == {}
    assert anymask.tuning.tune(q, k, v, mask, force=True)  # asked for explicitly: stored all the same
    assert tuning.entries("cpu") and len(calls) == 2


def test_concurrent_writers_keep_every_entry(cache_dir):
    script = textwrap.dedent("""
        import sys
        from anymask import tuning
        who = sys.argv[1]
        for i in range(40):
            tuning.store("machine", f"{who}-{i}", {"backend": "sdpa", "n": i})
    """)
    env = dict(os.environ, PYTHONPATH=SRC, ANYMASK_CACHE_DIR=str(cache_dir))
    procs = [subprocess.Popen([sys.executable, "-c", script, who], env=env) for who in ("a", "b", "c")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    entries = json.loads((cache_dir / "choices.json").read_text())["machines"]["machine"]
    assert set(entries) == {f"{who}-{i}" for who in "abc" for i in range(40)}
    assert not [f for f in os.listdir(cache_dir) if f.endswith(".tmp")]


class WrongBackend(B.Backend):
    """Fast and wrong (differentiable in q, k and v, so it is timed in both passes)."""

    name = "wrong_for_test"
    summary = "test only"

    def run(self, q, k, v, p):
        return q * 0.5 + (k.sum() + v.sum()) * 0


@pytest.fixture
def wrong_backend():
    B._MODULES["wrong_for_test"] = ("eager", "Eager")  # the module exists; the instance below is used
    B._INSTANCES["wrong_for_test"] = WrongBackend()
    yield "wrong_for_test"
    B._MODULES.pop("wrong_for_test", None)
    B._INSTANCES.pop("wrong_for_test", None)


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwd+bwd"])
def test_wrong_backend_is_never_chosen(wrong_backend, grad):
    from anymask.bench.choose import measure_problem

    p, inputs = problem(M.padding(torch.tensor([[1] * 32, [1] * 20 + [0] * 12])) & M.causal(), grad=grad)
    choice = measure_problem(p, first=inputs)
    assert wrong_backend in choice.ms, "the wrong backend must have been measured"
    assert wrong_backend in choice.rejected and "error" in choice.rejected[wrong_backend]
    assert choice.winner is not None and choice.winner != wrong_backend
    with torch.set_grad_enabled(grad):
        winner = tuning.tune(*inputs, p.mask, force=True)
    assert winner not in (None, wrong_backend)
    assert tuning.lookup(p) == winner


def test_tune_then_auto_uses_the_winner():
    mask = M.documents(lengths=[10, 22]) & M.causal()
    _, (q, k, v) = problem(mask)
    winner = anymask.tuning.tune(q, k, v, mask)
    assert winner in anymask.backends()
    assert anymask.which_backend(q, k, v, mask) == winner
    assert anymask.tuning.tune(q, k, v, mask) == winner  # cached: no second measurement


def test_autotune_env_measures_unseen_signature_once(monkeypatch, cache_dir):
    monkeypatch.setenv("ANYMASK_AUTOTUNE", "1")
    mask = M.window(4) & M.causal()
    p, (q, k, v) = problem(mask, seq=24)
    out = anymask.attention(q, k, v, mask)
    ref = anymask.attention(q.double(), k.double(), v.double(), mask, backend="eager")
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    sig = tuning.signature(p)
    entries = tuning.entries("cpu")
    assert sig in entries and entries[sig]["backend"] in anymask.backends()
    stamp = entries[sig]["measured_at"]
    anymask.attention(q, k, v, mask)
    assert tuning.entries("cpu")[sig]["measured_at"] == stamp  # not measured again



def test_autotune_inside_non_reentrant_checkpointing(monkeypatch):
    """The measurement runs in its own thread: checkpoint's saved-tensor hooks do not record its
    tensors (the recomputation, which does not measure, then saved fewer and backward raised)."""
    from torch.utils.checkpoint import checkpoint

    monkeypatch.setenv("ANYMASK_AUTOTUNE", "1")
    mask = M.window(6) & M.causal()
    p, (q, k, v) = problem(mask, seq=24, grad=True)
    out = checkpoint(lambda *t: anymask.attention(*t, mask), q, k, v, use_reentrant=False)
    out.sum().backward()
    assert tuning.signature(p) in tuning.entries("cpu")
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    anymask.attention(*leaves, mask, backend="eager").sum().backward()
    for got, ref in zip((q, k, v), leaves):
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=1e-5, rtol=1e-5)


def test_autotune_under_autocast_measures_the_call_autocast_makes(monkeypatch):
    """Under the caller's bf16 autocast a float32 call runs in bfloat16, as SDPA's would: the
    bfloat16 signature is measured, and nothing is stored for float32 (a float32 entry measured
    under autocast held bf16-sized errors, ~1e-2, loosening its correctness check 10^4-fold)."""
    monkeypatch.setenv("ANYMASK_AUTOTUNE", "1")
    mask = M.window(6) & M.causal()
    p, (q, k, v) = problem(mask, seq=40)
    p16, _ = problem(mask, seq=40, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert anymask.attention(q, k, v, mask).dtype == torch.bfloat16
    entries = tuning.entries("cpu")
    assert tuning.signature(p) not in entries
    assert entries[tuning.signature(p16)]["errors"]


def test_auto_remembers_its_choice_until_the_measured_choices_change(monkeypatch):
    mask = M.documents(lengths=[8, 8, 16]) & M.causal()
    p, (q, k, v) = problem(mask)
    first = anymask.which_backend(q, k, v, mask)
    assert first != "eager"
    calls = []
    real = tuning.lookup
    monkeypatch.setattr(tuning, "lookup", lambda p: calls.append(1) or real(p))
    for _ in range(3):  # the same mask object and shapes: decided once, then remembered
        assert anymask.which_backend(q, k, v, mask) == first
    assert len(calls) <= 1
    tuning.remember(p, {"backend": "eager", "ms": {"eager": 1.0}})  # a measurement lands
    assert anymask.which_backend(q, k, v, mask) == "eager"
    other = M.documents(lengths=[8, 8, 16]) & M.causal()  # an equal mask, another object: decided afresh
    assert anymask.which_backend(q, k, v, other) == "eager"


def test_a_measured_eager_win_is_not_applied_past_eager_s_size_limit():
    """Batch and heads are not in the signature: eager measured at B=2, H=4 must not materialise
    the scores of a call 256x larger with the same signature (measurement itself refuses eager there)."""
    from anymask.bench.variants import EAGER_LIMIT

    mask = M.window(8) & M.causal()
    small, (q, k, v) = problem(mask, seq=64)
    tuning.remember(small, {"backend": "eager"})
    assert anymask.which_backend(q, k, v, mask) == "eager"
    qb, kb = torch.randn(64, 32, 64, 16), torch.randn(64, 16, 64, 16)  # [B, H, S, D]: 2^23 scores
    assert 64 * 32 * 64 * 64 > EAGER_LIMIT["cpu"]
    assert tuning.signature(describe(qb, kb, kb, mask, None)) == tuning.signature(small)
    assert anymask.which_backend(qb, kb, kb, mask) != "eager"


def test_a_junk_autotune_setting_is_said_not_taken_as_off(monkeypatch):
    """``ANYMASK_AUTOTUNE=ture`` silently left measuring off; said on every call, also one whose
    decision is already made."""
    p, (q, k, v) = problem(M.documents(lengths=[8, 8, 16]) & M.causal())
    anymask.attention(q, k, v, p.mask)
    monkeypatch.setenv("ANYMASK_AUTOTUNE", "ture")
    with pytest.raises(ValueError, match="ANYMASK_AUTOTUNE='ture': use 1"):
        anymask.attention(q, k, v, p.mask)
    monkeypatch.setenv("ANYMASK_AUTOTUNE", "off")
    anymask.attention(q, k, v, p.mask)


def test_processes_autotuning_one_problem_keep_the_first_choice_stored(cache_dir):
    """Each DDP rank kept its own winner for one problem, and the file the last writer's."""
    p, _ = problem()
    assert tuning.remember(p, {"backend": "flex"}) == "flex"
    tuning.reload()  # as another process, which has not read the file since
    assert tuning.remember(p, {"backend": "sdpa"}, keep_existing=True) == "flex"
    assert tuning.lookup(p) == "flex"
    assert tuning.remember(p, {"backend": "sdpa"}) == "sdpa"  # anymask tune --force: a new measurement wins
    tuning.reload()
    assert tuning.lookup(p) == "sdpa"


def test_a_cache_file_that_cannot_be_read_is_not_replaced(cache_dir, monkeypatch):
    """A teammate's file this process could not read was replaced, their entries lost."""
    p, _ = problem()
    tuning.remember(p, {"backend": "flex"})
    before = (cache_dir / tuning.FILENAME).read_text()
    real = Path.read_text

    def unreadable(path, *args, **kwargs):
        if path.name == tuning.FILENAME:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", unreadable)
    tuning.reload()
    other, _ = problem(seq=256)
    with pytest.warns(UserWarning, match="cannot save the tuning cache .*cannot be read"):
        tuning.remember(other, {"backend": "sdpa"})
    monkeypatch.undo()
    assert (cache_dir / tuning.FILENAME).read_text() == before


def test_the_cache_file_follows_the_umask(cache_dir):
    """It was always 0600 (mkstemp), so a shared team folder's file could not be read by the team."""
    old = os.umask(0o002)
    try:
        tuning.remember(problem()[0], {"backend": "flex"})
    finally:
        os.umask(old)
    assert (cache_dir / tuning.FILENAME).stat().st_mode & 0o777 == 0o664


def test_autotune_measures_nothing_while_torch_export_traces(monkeypatch, cache_dir):
    """Non-strict export traced into the density count and failed on data-dependent values."""
    monkeypatch.setenv("ANYMASK_AUTOTUNE", "1")

    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return anymask.attention(q, k, v, M.causal())

    q = torch.randn(1, 2, 64, 16)
    torch.export.export(Attend(), (q, q, q))
    assert not (cache_dir / tuning.FILENAME).exists()


def test_temp_files_of_killed_writes_are_removed_once_old(cache_dir):
    """A write killed midway (SIGKILL) left its temp file, as large as the cache, for good."""
    dead, fresh = cache_dir / ".choices.1.2.dead.tmp", cache_dir / ".choices.1.2.fresh.tmp"
    for tmp in (dead, fresh):
        tmp.write_text("{}")
    os.utime(dead, (1.0, 1.0))
    tuning.remember(problem()[0], {"backend": "flex"})
    assert not dead.exists() and fresh.exists()  # a fresh one may be another process's write in flight
