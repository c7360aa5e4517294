"""Settings and data that cannot train are refused with one line; what the run reports is what runs
(train mode for gradient checkpointing and dropout, which fused kernels)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anymask.train import TrainConfig, data as D, train
from anymask.train.cli import main
from anymask.train.config import ConfigError

from .test_train_helpers import config, tiny_model_dir, write_jsonl  # noqa: F401  (fixture)
from .test_train_checkpoint import EXAMPLES, _data


def _train_sft(model, data, tmp_path, *extra) -> int:
    """``anymask train --task sft`` on ``data`` into ``tmp_path/out``; its exit code."""
    return main(["--model", model, "--task", "sft", "--data", data, "--output-dir", str(tmp_path / "out"),
                 "--no-progress", *extra])


@pytest.mark.parametrize("setting, message", [
    ({"temperature": 0.0}, "temperature must be a finite number > 0"),
    ({"epochs": 0}, "epochs must be a finite number > 0"),
    ({"lr": float("nan")}, "lr must be a finite number > 0"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
    ({"eval_every": -1}, "eval_every must be >= 0"),
    ({"max_grad_norm": -1.0}, "max_grad_norm must be >= 0"),
    ({"lora_dropout": 0.1, "kernels": "lora"}, "the fused LoRA has no dropout"),
    ({"weight_decay": float("nan")}, "weight_decay must be a finite number >= 0, got nan"),
    ({"lora_alpha": -3}, "lora_alpha must be a finite number > 0, got -3"),
    ({"lora_alpha": 0}, "lora_alpha must be a finite number > 0, got 0"),
    ({"mask_token": "<mask>"}, "mask_token is for --task diffusion .* --task sft has no mask token"),
    ({"mask_token_id": 3}, "mask_token_id is for --task diffusion"),
    ({"backend": "foo"}, "unknown backend 'foo'; known: auto, eager, sdpa"),
    ({"backend": "foo", "attn": "sdpa"}, "unknown backend 'foo'"),
    ({"backend": "eager", "attn": "sdpa"}, "--backend eager picks a backend of anymask's attention, but --attn sdpa"),
    ({"eval_data": "e.jsonl", "eval_fraction": 0.1}, "--eval-fraction 0.1 holds out part of --data for eval, but "
     "--eval-data e.jsonl is the eval data: drop one of them"),
    ({"seed": 2 ** 64}, "seed must be a 64-bit integer \\(a Python int\\), from -9223372036854775808 to "
     "18446744073709551615, got 18446744073709551616"),
    ({"seed": -(2 ** 63) - 1}, "seed must be a 64-bit integer"),
    ({"task": "embedding", "tokens_per_batch": 1}, "tokens_per_batch 1 cannot hold an embedding pair"),
])
def test_settings_that_cannot_train_are_refused(setting, message):
    cfg = TrainConfig(**{"model": "m", "task": "sft", "data": "d.jsonl", **setting})
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_seeds_torch_takes_are_taken():
    for seed in (-(2 ** 63), 0, 2 ** 63, 2 ** 64 - 1):
        TrainConfig(model="m", task="sft", data="d.jsonl", seed=seed).validate()


def test_layers_train_in_train_mode_without_eval_data(tiny_model_dir, tmp_path):  # noqa: F811
    """Gradient checkpointing recomputes a layer only in train mode: two MLP forwards per step."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # eval mode, as loaded
    modes = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    data = _data(tmp_path, "sft", 8)
    train(config(tiny_model_dir, "sft", data, tmp_path / "out", max_steps=1, gradient_checkpointing=True),
          model=model)
    assert modes == [True, True]


def test_auto_kernels_say_the_fused_lora_is_off_under_dropout(tiny_model_dir, tmp_path):  # noqa: F811
    data = _data(tmp_path, "sft", 8)
    result = train(config(tiny_model_dir, "sft", data, tmp_path / "out", max_steps=1, lora_dropout=0.1))
    assert "fused LoRA" not in result.kernels.split(";")[0]
    assert "no fused LoRA: lora_dropout 0.1" in result.kernels


def test_embedding_rows_of_one_pair_exit_2(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    data = _data(tmp_path, "embedding", 12)
    code = main(["--model", tiny_model_dir, "--task", "embedding", "--data", data, "--output-dir",
                 str(tmp_path / "out"), "--no-progress", "--dtype", "fp32", "--tokens-per-batch", "17",
                 "--truncate", "--max-steps", "1"])
    assert code == 2
    assert "nothing to learn from" in capsys.readouterr().err
    assert not (tmp_path / "out" / "adapter").exists()


def test_flex_attention_on_cpu_exits_2(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    data = _data(tmp_path, "sft", 8)
    code = _train_sft(tiny_model_dir, data, tmp_path, "--max-steps", "1", "--attn", "flex_attention")
    assert code == 2
    assert "flex_attention cannot train on cpu" in capsys.readouterr().err


def test_data_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(D.DataError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at column 14\)"):
        D.read_records(str(path), "diffusion")


def test_truncated_embedding_query_is_all_prompt(tiny_model_dir, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    long = {"query": "a very long question " * 10, "positive": "an answer that is also long " * 10}
    records = D.read_records(write_jsonl(tmp_path / "e.jsonl", [long]), "embedding")
    (query, positive), = [e.docs for e in D.tokenize(records, tok, "embedding", 32, truncate=True)]
    assert len(query.ids) + len(positive.ids) == 32
    assert query.prompt_len == len(query.ids) == 16


@pytest.mark.parametrize("flags, message", [
    (("--max-steps", "2", "--eval-every", "1"), "--eval-every 1 needs eval data"),
    (("--max-steps", "1", "--eval-fraction", "0.001"), "--eval-fraction 0.001 holds out none of the 8 examples"),
], ids=["eval_every_without_eval_data", "eval_fraction_that_holds_out_nothing"])
def test_eval_settings_without_eval_examples_exit_2(flags, message, tiny_model_dir, tmp_path, capsys):  # noqa: F811
    data = _data(tmp_path, "sft", 8)
    assert _train_sft(tiny_model_dir, data, tmp_path, *flags) == 2
    assert message in capsys.readouterr().err


def test_load_adapter_takes_the_task_it_was_trained_for(tiny_model_dir, tmp_path):  # noqa: F811
    import anymask.hf
    from anymask.train import load_adapter

    data = _data(tmp_path, "embedding", 12)
    result = train(config(tiny_model_dir, "embedding", data, tmp_path / "out", max_steps=1, save_every=1))
    for adapter in (result.adapter_dir, tmp_path / "out" / "checkpoint-000001" / "adapter"):
        assert anymask.hf.get_mask(load_adapter(tiny_model_dir, str(adapter)))[0] == "bidirectional"
    with pytest.raises(ConfigError, match="trained for task 'embedding', not 'sft'"):
        load_adapter(tiny_model_dir, result.adapter_dir, task="sft")
    with pytest.raises(ConfigError, match="unknown task 'embeding'"):
        load_adapter(tiny_model_dir, result.adapter_dir, task="embeding")
    with pytest.raises(ConfigError, match="holds no adapter; anymask train saves it in .*out/adapter"):
        load_adapter(tiny_model_dir, str(tmp_path / "out"))  # the output dir, not its adapter/


def test_a_fresh_run_refuses_an_earlier_runs_adapter_and_metrics(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    """Without checkpoints a second fresh run replaced the first one's adapter without a word."""
    data = _data(tmp_path, "sft", 8)
    assert _train_sft(tiny_model_dir, data, tmp_path, "--max-steps", "1") == 0
    adapter = (tmp_path / "out" / "adapter" / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    for resume in ([], ["--resume", "auto"]):  # auto with no checkpoint to resume from is a fresh run
        assert _train_sft(tiny_model_dir, data, tmp_path, "--max-steps", "1", "--seed", "1", *resume) == 2
        assert "holds an earlier run's adapter and metrics.jsonl" in capsys.readouterr().err
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").read_bytes() == adapter


def test_warmup_past_the_last_step_is_said(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    data = _data(tmp_path, "sft", 8)
    assert _train_sft(tiny_model_dir, data, tmp_path, "--max-steps", "2", "--warmup-steps", "4") == 0
    err = capsys.readouterr().err
    assert "--warmup-steps 4 is more than the run's 2 steps: the learning rate never reaches --lr" in err
    assert "(it ends at 50% of it)" in err


def test_train_prints_warnings_as_one_line_each():
    import warnings

    from anymask.train.cli import _one_line_warnings

    with _one_line_warnings():
        assert warnings.formatwarning("resuming from x", UserWarning, "/a/loop.py", 143) == \
            "anymask train: warning: resuming from x\n"
        assert warnings.formatwarning("old", FutureWarning, "/a/b.py", 1, "code") == "anymask train: FutureWarning: old\n"
    assert "/a/loop.py:143" in warnings.formatwarning("resuming from x", UserWarning, "/a/loop.py", 143)


def test_micro_batches_without_a_loss_unit_are_counted(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    """A long embedding pair alone in its row has no in-batch negative: the run says how many such rows."""
    rows = (EXAMPLES / "embedding.jsonl").read_text().splitlines()[:12]
    long = {"query": "a question that goes on " * 40, "positive": "an answer that goes on and on " * 40}
    data = write_jsonl(tmp_path / "e.jsonl", [*rows, long])
    code = main(["--model", tiny_model_dir, "--task", "embedding", "--data", data, "--output-dir",
                 str(tmp_path / "out"), "--no-progress", "--dtype", "fp32", "--tokens-per-batch", "96",
                 "--truncate", "--max-steps", "1"])  # the long pair is cut to fill a row alone
    assert code == 0
    assert "1 of" in capsys.readouterr().err


def test_attention_dropout_is_turned_off_with_a_note(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    """anymask attention has no dropout: a config with some trains (in train mode) with none, and says so."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, attention_dropout=0.1)
    data = _data(tmp_path, "sft", 8)
    result = train(config(tiny_model_dir, "sft", data, tmp_path / "out", max_steps=1), model=model)
    assert len(result.losses) == 1
    assert "attention dropout 0.1 -> 0" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="these backends can train on CUDA")
@pytest.mark.parametrize("backend, message", [
    ("flex", "--backend flex cannot train on cpu: FlexAttention has no backward there"),
    ("triton", "--backend triton is not available here: no CUDA device"),
])
def test_backend_that_cannot_train_here_exits_2_before_loading(backend, message, tmp_path, capsys):
    code = _train_sft("no-such-model", "no-such.jsonl", tmp_path, "--backend", backend)
    assert code == 2
    err = capsys.readouterr().err
    assert f"anymask train: error: {message}" in err and "Traceback" not in err


def test_backend_that_cannot_run_the_tasks_mask_exits_2_before_the_first_step(tiny_model_dir, tmp_path,  # noqa: F811
                                                                               capsys):
    """varlen cannot run prefix_lm's per-document prompts: it failed inside the first forward."""
    data = _data(tmp_path, "prefix_lm", 8)
    code = main(["--model", tiny_model_dir, "--task", "prefix_lm", "--data", data, "--output-dir",
                 str(tmp_path / "out"), "--no-progress", "--dtype", "fp32", "--backend", "varlen"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "Loading weights" not in err
    assert "anymask train: error: --backend varlen cannot train --task prefix_lm here: prefix-LM" in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_the_adapter_names_a_relative_models_absolute_path(tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    """It recorded ``--model`` as typed (``./tiny``), which peft's AutoPeftModel cannot load elsewhere."""
    import json
    import os

    data = _data(tmp_path, "sft", 8)
    monkeypatch.chdir(Path(tiny_model_dir).parent)
    assert _train_sft(os.path.join(".", Path(tiny_model_dir).name), data, tmp_path, "--max-steps", "1",
                      "--dtype", "fp32") == 0
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())


def test_parallel_without_torchrun_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = _train_sft("no-such-model", "no-such.jsonl", tmp_path, "--parallel", "ddp")
    assert code == 2
    assert "--parallel ddp needs a launcher that starts the processes: torchrun --nproc-per-node" in \
        capsys.readouterr().err


def test_load_adapter_takes_a_model_path_and_an_adapter_that_exists(tiny_model_dir, tmp_path):  # noqa: F811
    from anymask.train import load_adapter

    with pytest.raises(TypeError, match="model_path is the base model's directory or hub name .* not a Linear"):
        load_adapter(torch.nn.Linear(2, 2), str(tmp_path))
    with pytest.raises(ConfigError, match="adapter directory '.*nowhere' not found"):
        load_adapter(tiny_model_dir, str(tmp_path / "nowhere"))


def test_temperature_outside_embedding_exits_2(tmp_path, capsys):
    assert _train_sft("no-such-model", "no-such.jsonl", tmp_path, "--temperature", "0.1") == 2
    assert "--temperature is for --task embedding (its InfoNCE loss); --task sft has none" in capsys.readouterr().err


def _idle_embedding_data(tmp_path) -> str:
    """Four long (query, positive) pairs that each fill a 256-token row alone, and two short ones that share one."""
    long = " ".join(["alpha beta gamma delta"] * 20)
    rows = [{"query": f"q{i} " + long, "positive": f"p{i} " + long} for i in range(4)]
    rows += [{"query": "dog sound", "positive": "The dog barks."}, {"query": "cat sound", "positive": "The cat meows."}]
    return write_jsonl(tmp_path / "idle.jsonl", rows)


def _adapter(out, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / f"checkpoint-{step:06d}" / "adapter" / "adapter_model.safetensors"))


def test_embedding_step_without_a_loss_unit_updates_nothing(tiny_model_dir, tmp_path):  # noqa: F811
    """A step whose rows are all one pair alone has no loss: logged as null, not 0.0; the adapter stays as it
    was (no AdamW momentum step), the lr schedule goes on, and a run resumed at such a step matches."""
    import json

    data = _idle_embedding_data(tmp_path)
    full = train(config(tiny_model_dir, "embedding", data, tmp_path / "a", max_steps=10, save_every=1))
    idle = [h["step"] for h in full.history if h["loss"] is None]
    assert len(idle) == 8 and all(loss > 0 for loss in full.losses if loss is not None)
    for step in idle[1:]:
        before, after = _adapter(tmp_path / "a", step - 1), _adapter(tmp_path / "a", step)
        assert all(torch.equal(before[k], after[k]) for k in before), f"step {step} moved the adapter"
    logged = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] is None for r in logged if "lr" in r] == [h["loss"] is None for h in full.history]
    lrs = [r["lr"] for r in logged if "lr" in r]
    assert lrs == sorted(lrs, reverse=True) and len(set(lrs)) == 10  # one scheduler step per step
    resume_at = next(s for s in idle if any(h["loss"] is not None for h in full.history[s:]))
    resumed = train(config(tiny_model_dir, "embedding", data, tmp_path / "b", max_steps=10,
                           resume=str(tmp_path / "a" / f"checkpoint-{resume_at:06d}")))
    assert [x is None for x in resumed.losses] == [x is None for x in full.losses[resume_at:]]
    assert [x for x in resumed.losses if x is not None] == \
        pytest.approx([x for x in full.losses[resume_at:] if x is not None], rel=1e-5, abs=1e-6)
    # Saving before the first optimizer step leaves the run as it was: torch fills an empty AdamW
    # state with a zero step to save it, which made the first real update count as AdamW's second.
    assert idle[0] == 1
    unsaved = train(config(tiny_model_dir, "embedding", data, tmp_path / "c", max_steps=10))
    assert unsaved.losses == full.losses
    from safetensors.torch import load_file

    final, final_unsaved = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in "ac")
    assert all(torch.equal(final[k], final_unsaved[k]) for k in final)


def test_embedding_eval_without_a_loss_unit_is_skipped(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    """--eval-fraction 0.05 of 20 examples holds out one pair, alone in its row: no eval loss (not 0.0), a note."""
    data = _data(tmp_path, "embedding", 20)
    result = train(config(tiny_model_dir, "embedding", data, tmp_path / "out", max_steps=1, eval_fraction=0.05))
    assert result.evals == []
    assert "eval_loss" not in (tmp_path / "out" / "metrics.jsonl").read_text()
    assert "anymask train: no eval micro-batch has a loss unit" in capsys.readouterr().err


def test_micro_batches_past_the_last_whole_step_are_reported(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    """An epoch uses whole steps of --grad-accum micro-batches; what is left over is said, with counts."""
    from anymask.train.distributed import Dist
    from anymask.train.stream import Stream

    data = _data(tmp_path, "sft", 24)
    cfg = config(tiny_model_dir, "sft", data, tmp_path / "out", max_steps=1, tokens_per_batch=96, grad_accum=3,
                 truncate=True)
    train(cfg)
    err = capsys.readouterr().err
    examples = D.tokenize(D.read_records(data, "sft"), _tokenizer(tiny_model_dir), "sft", 96, truncate=True)
    stream = Stream({0: examples}, 96, 3, cfg.seed, Dist(0, 1, torch.device("cpu"), "none"))
    rows = len(stream.rows(0))
    left = rows % 3
    assert left, "the data should not fill whole steps exactly"
    docs = sum(len(r.doc_lengths) for r in stream.rows(0)[rows - left:])
    assert f"{left} of {rows} packed micro-batches of epoch 0 ({docs} documents) are past its last whole step" in err


def _tokenizer(model_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(model_dir)
