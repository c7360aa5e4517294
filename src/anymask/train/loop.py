"""``train(config)``: the training loop shared by the CLI, the Python API and torchrun.

Per step and rank: ``grad_accum`` packed micro-batches; each micro-batch's loss sum is divided by
the number of loss units in the *global* batch (all ranks), so every unit weighs the same whatever
the packing, the accumulation or the world size; a step whose global batch has no loss unit
updates nothing (its loss is None, ``null`` in ``metrics.jsonl``).  Rank 0 shows a progress bar
(loss, tokens/s), appends to ``output_dir/metrics.jsonl``, and writes checkpoints and the final
adapter.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import checkpoint, data, distributed, fused, model as M, tasks
from .config import ConfigError, TrainConfig
from .packing import Packed, pack, shard
from .stream import Stream, local_shards, split


@dataclass
class TrainResult:
    """What a run did: per-step history (loss, tokens, seconds), eval losses, where things are."""

    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    adapter_dir: str | None = None
    peak_memory_bytes: int | None = None
    model: object = None  # the trained peft model (unwrapped)
    kernels: str = ""  # which fused kernels ran, or why none did

    @property
    def losses(self) -> list[float | None]:
        """The loss of each step; None for a step with no loss unit (it updated nothing)."""
        return [h["loss"] for h in self.history]


def train(config: TrainConfig, *, model=None, tokenizer=None, examples: list | None = None,
          eval_examples: list | None = None) -> TrainResult:
    """Run ``config``.  ``model`` (a loaded transformers model, no adapters yet), ``tokenizer`` and
    already tokenized ``examples`` (:class:`anymask.train.data.Example`) replace loading from
    ``config.model`` / ``config.data`` when given."""
    config.validate()
    d = distributed.setup(config.parallel)
    try:
        with _sigterm_as_interrupt():
            return _run(config, d, model, tokenizer, examples, eval_examples)
    except KeyboardInterrupt:
        if d.main:  # an interrupt between a checkpoint's mkdir and its cleanup can leave the temporary dir
            checkpoint.clean_partial(Path(config.output_dir))
        raise
    finally:
        distributed.shutdown(d)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (what torchrun and schedulers send) unwinds like Ctrl-C, so no write is left half-done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(cfg: TrainConfig, d, base, tokenizer, examples, eval_examples) -> TrainResult:
    out_dir = _prepare_output_dir(cfg, d)
    _check_attention(cfg, d.device)
    torch.manual_seed(cfg.seed)
    if tokenizer is None and (examples is None or cfg.task == "diffusion" and cfg.mask_token_id is None):
        tokenizer = M.load_tokenizer(cfg.model, cfg.gguf_file)
    task = tasks.make(cfg.task, tokenizer=tokenizer, temperature=cfg.temperature, mask_token=cfg.mask_token,
                      mask_token_id=cfg.mask_token_id)
    count = cfg.data_shards or d.world
    mine = local_shards(count, d)
    failure, stream, eval_rows, fingerprint = None, None, [], None
    try:
        train_ex, eval_ex = _examples(cfg, tokenizer, examples, eval_examples, mine, count, d)
        fingerprint = None if examples is not None else data.fingerprint(cfg.data)
        stream = Stream(split(train_ex, mine, count), cfg.tokens_per_batch, cfg.grad_accum, cfg.seed, d)
        eval_rows = pack(eval_ex, cfg.tokens_per_batch, seed=cfg.seed, shuffle=False)
    except Exception as exc:  # every rank must hear about a data error, or the others wait forever
        failure = exc
    d.agree(failure)
    if cfg.eval_every and d.sum(len(eval_rows)) == 0:
        raise ConfigError(f"--eval-every {cfg.eval_every} needs eval data: --eval-data FILE, --eval-fraction F "
                          "large enough to hold out at least one example, or eval_examples= (Python API, when "
                          "examples= is given)")
    eval_rows = _eval_rows_with_units(eval_rows, task, d)

    if base is None:
        base = M.load_base(cfg.model, dtype=cfg.dtype, attn=cfg.attn, gguf_file=cfg.gguf_file, device=d.device,
                           progress=cfg.progress and d.main)
    _check_backend_takes_task(cfg, task, base.config, d.device)
    liger, lora = fused.resolve(cfg.kernels, base, d.device, cfg.lora_dropout)
    peft_model = M.prepare(base.to(d.device), task, attn=cfg.attn, backend=cfg.backend, dtype=cfg.dtype,
                           lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                           lora_targets=cfg.lora_targets, gradient_checkpointing=cfg.gradient_checkpointing,
                           seed=cfg.seed, liger=liger, fused_lora=lora)
    if Path(cfg.model).is_dir():  # the saved adapter names its base so that it loads from any directory
        for adapter in peft_model.peft_config.values():
            adapter.base_model_name_or_path = str(Path(cfg.model).resolve())
    fused_head = fused.fused_head(peft_model, liger, d.mode)
    module = M.TaskModel(peft_model, task, cfg.attn, fused_head=fused_head)
    wrapped = distributed.wrap(module, d, M.decoder_layers(peft_model) if d.mode == "fsdp2" else [])
    params = [p for p in module.parameters() if p.requires_grad]

    steps_per_epoch = stream.steps_in_epoch(0)
    if steps_per_epoch == 0:
        raise ConfigError(f"not enough data for one step: every rank needs {cfg.grad_accum} packed micro-batches "
                         f"of up to {cfg.tokens_per_batch} tokens per step")
    units = [task.count(row) for row in stream.rows(0)]
    if d.sum(sum(units)) == 0:
        raise ConfigError(f"nothing to learn from: no packed micro-batch of the data has a loss unit ({task.units})")
    idle, rows = int(d.sum(sum(u == 0 for u in units))), int(d.sum(len(units)))
    if idle and d.main:
        print(f"anymask train: {idle} of {rows} packed micro-batches of epoch 0 have no loss unit and teach nothing "
              f"({task.units}); a step with none in any micro-batch updates nothing (loss null)", file=sys.stderr)
    left_rows, left_docs = (int(d.sum(n)) for n in stream.left_out(0))
    if left_rows and d.main:
        print(f"anymask train: {left_rows} of {rows} packed micro-batches of epoch 0 ({left_docs} documents) are "
              f"past its last whole step ({cfg.grad_accum} micro-batches per rank) and left out of it; each epoch "
              "packs afresh, so later epochs leave out others (lower --grad-accum or --tokens-per-batch to use "
              "more of each epoch)", file=sys.stderr)
    total = cfg.max_steps or _steps_for_epochs(stream, cfg.epochs)

    start = 0
    resume = checkpoint.latest(out_dir) if cfg.resume == "auto" else cfg.resume
    if cfg.resume == "auto" and resume is None and d.main:
        print(f"anymask train: no checkpoint in {out_dir} (checkpoints come with --save-every N); starting at step 0",
              file=sys.stderr)
    schedule = {"lr": cfg.lr, "warmup_steps": cfg.warmup_steps, "total_steps": total}
    if cfg.warmup_steps > total and not resume and d.main:
        print(f"anymask train: --warmup-steps {cfg.warmup_steps} is more than the run's {total} steps: the learning "
              f"rate never reaches --lr {cfg.lr:g} (it ends at {total / cfg.warmup_steps:.0%} of it)", file=sys.stderr)
    if resume:  # the checkpoint's schedule goes on: LambdaLR's state has its step and peak lr, not its shape
        schedule = checkpoint.saved_schedule(Path(resume), steps_per_epoch)
        checkpoint.check_config(Path(resume), asdict(cfg), schedule, total, fingerprint, world=d.world)
    optimizer = torch.optim.AdamW(params, lr=schedule["lr"], weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(schedule["warmup_steps"],
                                                                       schedule["total_steps"]))
    if resume:
        start = checkpoint.load(Path(resume), peft_model, optimizer, scheduler, d)["step"]

    result = TrainResult(kernels=fused.describe(cfg.kernels, liger, lora, fused_head, base, d.device, cfg.lora_dropout))
    bar = _progress(cfg, d, total, start)
    if bar is not None:
        bar.write(f"kernels: {result.kernels}")
    in_effect = dict(asdict(cfg), weight_decay=optimizer.param_groups[0]["weight_decay"])  # a resumed optimizer's
    ckpt_state = {"config": in_effect, "schedule": schedule,  # what each checkpoint's state.json adds
                  "model_files": checkpoint.model_files(cfg.model)}
    if fingerprint is not None:
        ckpt_state["data_fingerprint"] = fingerprint
    epoch, index, steps_per_epoch = _position(stream, start)  # epochs pack differently: count the one resumed in
    _trim_metrics(out_dir, d, start, total)
    wrapped.train()  # from_pretrained gives eval mode: LoRA dropout and gradient checkpointing need train mode
    if start == 0:
        _eval(wrapped, eval_rows, task, d, 0, result, out_dir, None)  # the loss before training
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    try:
        for step in range(start + 1, total + 1):
            if index == steps_per_epoch:  # the epoch is used up
                epoch, index, steps_per_epoch = _next_epoch(stream, epoch, bar, d)
            micro = [b.to(d.device) for b in stream.step(epoch, index)]
            lr = scheduler.get_last_lr()[0]
            t0 = time.perf_counter()
            loss = train_step(wrapped, micro, task, optimizer, scheduler, params, cfg, d)
            if loss is not None and not math.isfinite(loss):
                raise FloatingPointError(f"step {step}: the loss is {loss}; stopping before it reaches the adapter "
                                         f"(lower --lr, or check the data; the last checkpoint is in {out_dir})")
            if d.device.type == "cuda":
                torch.cuda.synchronize(d.device)
            seconds = time.perf_counter() - t0
            tokens = int(d.sum(sum(b.num_tokens for b in micro)))
            record = {"step": step, "loss": loss, "tokens": tokens, "seconds": seconds, "lr": lr}
            result.history.append(record)
            _log(out_dir, d, record)
            if bar is not None:
                if loss is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / seconds:,.0f}")
                bar.update(1)
            index += 1
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                _eval(wrapped, eval_rows, task, d, step, result, out_dir, bar)
            if cfg.save_every and step % cfg.save_every == 0:
                checkpoint.save(out_dir / f"checkpoint-{step:06d}", peft_model, optimizer, scheduler, step, d,
                                ckpt_state)
    finally:
        if bar is not None:
            bar.close()
    if d.device.type == "cuda":
        result.peak_memory_bytes = int(torch.cuda.max_memory_allocated(d.device))
        _log(out_dir, d, {"step": total, "peak_memory_bytes": int(d.max(result.peak_memory_bytes))})  # max over ranks
    _eval(wrapped, eval_rows, task, d, total, result, out_dir, None)
    checkpoint.save_adapter(peft_model, out_dir / "adapter", d, tokenizer, task=cfg.task)
    result.adapter_dir = str(out_dir / "adapter")
    result.model = peft_model
    return result


def _prepare_output_dir(cfg: TrainConfig, d) -> Path:
    """``cfg.output_dir``, created and checked writable by rank 0, temporary dirs of a killed run
    removed; a fresh run (no ``resume``) refuses a directory that holds checkpoints, and a fresh run
    or ``--resume auto`` with nothing to resume one that holds an earlier run's results.  Every rank
    raises when rank 0 does."""
    out_dir = Path(cfg.output_dir)
    failure = None
    if d.main:
        try:
            if cfg.resume is None or (cfg.resume != "auto" and not _same_dir(Path(cfg.resume).parent, out_dir)):
                _refuse_earlier_checkpoints(out_dir, elsewhere=cfg.resume is not None)
                _refuse_earlier_results(out_dir)
            elif cfg.resume == "auto":
                if not checkpoint.complete(out_dir):
                    _refuse_earlier_results(out_dir)
            else:
                _refuse_later_checkpoints(out_dir, Path(cfg.resume))
            _make_writable_dir(out_dir)
            checkpoint.clean_partial(out_dir)
        except ConfigError as exc:
            failure = exc
    d.agree(failure)
    return out_dir


def _refuse_earlier_checkpoints(out_dir: Path, elsewhere: bool = False) -> None:
    """A fresh run (or one resumed from another directory's checkpoint) beside an earlier run's
    checkpoints would leave them there, and ``--resume auto`` would later pick the newest step
    whichever run wrote it: refuse, naming them."""
    found = checkpoint.complete(out_dir)
    if not found:
        return
    start = "resumed from another directory's checkpoint, this run" if elsewhere else "to start afresh"
    raise ConfigError(f"--output-dir {str(out_dir)!r} holds checkpoints of an earlier run ({_names(found)}): pass "
                      f"--resume auto to go on from the newest, or --resume PATH from one of them; {start}, choose "
                      "another --output-dir or delete them")


def _refuse_later_checkpoints(out_dir: Path, resume: Path) -> None:
    """Resuming from an older checkpoint of ``out_dir`` would leave the newer ones there, to be
    mixed with this run's by a later ``--resume auto`` (and its metrics): refuse, naming them."""
    step = checkpoint.read_state(resume)["step"]
    later = [p for p in checkpoint.complete(out_dir) if checkpoint.read_state(p)["step"] > step]
    if later:
        raise ConfigError(f"--output-dir {str(out_dir)!r} holds checkpoints after {resume.name} ({_names(later)}): "
                          "going on from an earlier one would mix two runs' checkpoints and metrics; delete them, "
                          "or resume into another --output-dir")


def _names(found: list[Path]) -> str:
    return ", ".join(p.name for p in found) if len(found) <= 3 else \
        f"{found[0].name} to {found[-1].name}, {len(found)} in all"


def _same_dir(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _refuse_earlier_results(out_dir: Path) -> None:
    """A fresh run would replace an earlier run's adapter and metrics: refuse, naming them."""
    results = [name for name, file in (("adapter", "adapter/adapter_config.json"), ("metrics.jsonl", "metrics.jsonl"))
               if (out_dir / file).is_file()]
    if results:
        unsaved = "" if checkpoint.complete(out_dir) else " (and no checkpoint to resume from: a run stopped before " \
                                                          "its first --save-every step leaves only metrics.jsonl)"
        raise ConfigError(f"--output-dir {str(out_dir)!r} holds an earlier run's {' and '.join(results)}{unsaved}: a "
                          "fresh run would replace them; choose another --output-dir or delete them")


def _make_writable_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and write a file in it: a :class:`ConfigError` saying which failed, not
    an ``OSError`` that reads like a model that cannot load."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        what = "it is a file" if out_dir.is_file() else exc.strerror or exc
        raise ConfigError(f"cannot create --output-dir {str(out_dir)!r}: {what}") from None
    try:
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot write in --output-dir {str(out_dir)!r}: {exc.strerror or exc}") from None


def _check_attention(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse, before anything loads, attention that cannot train here: FlexAttention (transformers'
    or anymask's flex backend) has no backward off CUDA, and a forced anymask backend must be
    available on this machine (:func:`anymask.backends` says why not)."""
    if cfg.attn == "flex_attention" and device.type != "cuda":
        raise ConfigError(f"--attn flex_attention cannot train on {device.type}: FlexAttention has no backward "
                          "there; use --attn anymask (or sdpa)")
    if cfg.attn != "anymask" or cfg.backend == "auto":
        return
    if cfg.backend == "flex" and device.type != "cuda":
        raise ConfigError(f"--backend flex cannot train on {device.type}: FlexAttention has no backward there; "
                          "use --backend auto (or sdpa, eager)")
    import anymask

    found = anymask.backends().get(cfg.backend)
    reasons = found["reasons"] if found else ["its module is not in this install of anymask"]
    if reasons:
        raise ConfigError(f"--backend {cfg.backend} is not available here: {'; '.join(reasons)}; "
                          "use --backend auto to let dispatch pick one that is")


def _check_backend_takes_task(cfg: TrainConfig, task, config, device: torch.device) -> None:
    """Refuse a forced anymask backend that cannot train this task's mask (``varlen`` and the
    per-document prompts of prefix_lm) before the first step, with its reasons: asked on a packed
    row of two documents with this model's heads, head dim and dtype."""
    if cfg.attn != "anymask" or cfg.backend == "auto":
        return
    import anymask

    config = config.get_text_config() if hasattr(config, "get_text_config") else config  # Gemma 3 and the like
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    doc_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])  # [1, 8]: two documents, each half prompt
    row = Packed(torch.zeros_like(doc_ids), torch.arange(4).repeat(2)[None], doc_ids,
                 torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0]], dtype=torch.bool), (4, 4), cfg.seed).to(device)
    q = torch.zeros(1, heads, 8, head_dim, dtype=M.DTYPES[cfg.dtype], device=device, requires_grad=True)
    kv = torch.zeros(1, kv_heads, 8, head_dim, dtype=q.dtype, device=device, requires_grad=True)
    reasons = anymask.backends(q, kv, kv, task.mask(row))[cfg.backend]["reasons"]
    if reasons:
        raise ConfigError(f"--backend {cfg.backend} cannot train --task {cfg.task} here: {'; '.join(reasons)}; "
                          "use --backend auto to let dispatch pick one that can")


def _examples(cfg, tokenizer, examples, eval_examples, mine, count, d):
    """(train examples, indexed globally; only this rank's shards are tokenized, the others are
    None) and this rank's share of the eval examples."""
    if examples is not None:
        return examples, shard(list(eval_examples or []), d.rank, d.world)
    records = data.read_records(cfg.data, cfg.task)
    if cfg.eval_data:
        eval_records = data.read_records(cfg.eval_data, cfg.task)
    else:
        held = int(len(records) * cfg.eval_fraction)
        if cfg.eval_fraction and not held:
            raise ConfigError(f"--eval-fraction {cfg.eval_fraction} holds out none of the {len(records)} examples "
                              f"in {cfg.data} ({len(records)} x {cfg.eval_fraction} < 1): raise it, or give "
                              "--eval-data FILE")
        records, eval_records = records[:len(records) - held], records[len(records) - held:]
    own = set(mine)
    keep = [r if i % count in own else None for i, r in enumerate(records)]
    toks = iter(data.tokenize([r for r in keep if r is not None], tokenizer, cfg.task, cfg.tokens_per_batch,
                              truncate=cfg.truncate, path=cfg.data))
    train_ex = [next(toks) if r is not None else None for r in keep]
    eval_ex = data.tokenize(shard(eval_records, d.rank, d.world), tokenizer, cfg.task, cfg.tokens_per_batch,
                            truncate=cfg.truncate, path=cfg.eval_data or cfg.data)
    return train_ex, eval_ex


def train_step(wrapped, micro: list[Packed], task, optimizer, scheduler, params, cfg, d) -> float | None:
    """One optimizer step over this rank's micro-batches; returns the global mean loss.

    When no micro-batch of the global batch has a loss unit (embedding rows of one pair) there is
    nothing to learn: no forward, no optimizer step (AdamW would still move the weights by its
    momentum and weight decay); returns None.  The scheduler steps all the same, so its count stays
    the step number, like the data position, and a resumed run lines up with an uninterrupted one."""
    units = d.sum(sum(task.count(b) for b in micro))  # loss units in the global batch
    if units == 0:
        _step_scheduler_alone(scheduler)
        return None
    scale = d.world / units  # DDP / FSDP average gradients over ranks; undo that
    total = torch.zeros((), device=d.device)
    for j, batch in enumerate(micro):
        with distributed.no_sync(wrapped, d, skip=j < len(micro) - 1):
            loss_sum = wrapped(batch)
            (loss_sum * scale).backward()
        total += loss_sum.detach().float()
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return d.sum(total.item()) / units


def _step_scheduler_alone(scheduler) -> None:
    """``scheduler.step()`` for a step whose optimizer did not step (on purpose: no torch warning)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        scheduler.step()


def _eval_rows_with_units(rows: list[Packed], task, d) -> list[Packed]:
    """``rows``, or none (with a note) when no eval row of any rank has a loss unit: their mean
    loss would be 0 / 0, not a number to log."""
    if d.sum(len(rows)) == 0 or d.sum(sum(task.count(r) for r in rows)) > 0:
        return rows
    if d.main:
        print(f"anymask train: no eval micro-batch has a loss unit ({task.units}): no eval loss is computed",
              file=sys.stderr)
    return []


@torch.no_grad()
def _eval(wrapped, rows: list[Packed], task, d, step: int, result: TrainResult, out_dir: Path, bar) -> None:
    """Mean loss over the eval rows of all ranks.  Ranks run the same number of forwards (FSDP2
    needs that): a rank with fewer rows repeats its first one with weight 0."""
    n = int(d.max(len(rows)))
    if n == 0:
        return
    was_training = wrapped.training
    wrapped.eval()
    total, units = 0.0, 0.0
    for i in range(n):
        real = i < len(rows)
        batch = (rows[i] if real else (rows[0] if rows else _dummy())).to(d.device)
        value = float(wrapped(batch))
        if real:
            total, units = total + value, units + task.count(batch)
    wrapped.train(was_training)
    loss = d.sum(total) / max(d.sum(units), 1.0)
    record = {"step": step, "eval_loss": loss}
    result.evals.append(record)
    _log(out_dir, d, record)
    if bar is not None:
        bar.write(f"step {step}: eval loss {loss:.4f}")


def _dummy() -> Packed:
    z = torch.zeros(1, 2, dtype=torch.long)
    return Packed(z, torch.arange(2).unsqueeze(0), z, torch.tensor([[True, False]]), (1, 1), 0)


def _position(stream: Stream, step: int) -> tuple[int, int, int]:
    """(epoch, index within it, its step count) after ``step`` completed steps; the index equals
    the count when the last step ended the epoch (the next one is looked up when needed)."""
    epoch, n = 0, stream.steps_in_epoch(0)
    while step > n:
        step -= n
        epoch, n = stream.next_epoch(epoch)
    return epoch, step, n


def _next_epoch(stream: Stream, epoch: int, bar, d) -> tuple[int, int, int]:
    """(epoch, index 0, its step count) of the epoch after ``epoch`` that has a step; says which
    epochs in between packed into too few micro-batches for one and are skipped."""
    later, steps = stream.next_epoch(epoch)
    if later > epoch + 1 and d.main:
        skipped = f"epoch {epoch + 1}" if later == epoch + 2 else f"epochs {epoch + 1}-{later - 1}"
        text = (f"anymask train: {skipped} packed into too few micro-batches for a step (--grad-accum "
                f"{stream.grad_accum}): skipped")
        if bar is None:
            print(text, file=sys.stderr)
        else:
            bar.write(text, file=sys.stderr)
    return later, 0, steps


def _steps_for_epochs(stream: Stream, epochs: float) -> int:
    """The steps of ``epochs`` passes over the data: every step of each whole epoch (each packs to
    its own step count), then the fraction of the next one's, rounded up."""
    whole = int(epochs)
    steps = sum(stream.steps_in_epoch(e) for e in range(whole))
    if epochs > whole:
        steps += math.ceil(round((epochs - whole) * stream.steps_in_epoch(whole), 9))  # 1.6 - 1 is 0.6000000000000001
    return max(1, steps)


def _schedule(warmup: int, total: int):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _progress(cfg, d, total: int, start: int):
    if not (cfg.progress and d.main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=f"train {cfg.task}", unit="step", dynamic_ncols=True)


def _trim_metrics(out_dir: Path, d, start: int, total: int) -> None:
    """A fresh run starts ``metrics.jsonl`` anew; a resumed one keeps the records up to ``start``,
    so steps run again after the checkpoint are not logged twice (nor, resumed at its last step
    ``total``, the closing eval)."""
    path = out_dir / "metrics.jsonl"
    if not d.main or not path.exists():
        return
    kept = []
    if start:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            final = start == total and "loss" not in record  # a finished run's closing eval: run again
            if record.get("step", 0) <= start and "peak_memory_bytes" not in record and not (
                    final and record.get("step") == start):
                kept.append(line + "\n")
    path.write_text("".join(kept), encoding="utf-8")


def _log(out_dir: Path, d, record: dict) -> None:
    if d.main:
        with open(out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
