"""The ``train`` subcommand: argument wiring and bad data reported with the line number."""

from __future__ import annotations

import argparse

from anymask.train.cli import config_from_args, main, register

from .test_train_helpers import tiny_model_dir, write_jsonl  # noqa: F401  (fixture)


def test_register_adds_train_with_every_option():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--model", "m", "--task", "diffusion", "--data", "d.jsonl", "--truncate",
                              "--grad-accum", "4", "--parallel", "fsdp2", "--mask-token", "<mask>", "--dtype", "fp32"])
    cfg = config_from_args(args)
    assert (cfg.task, cfg.truncate, cfg.grad_accum, cfg.parallel, cfg.mask_token, cfg.dtype) == \
        ("diffusion", True, 4, "fsdp2", "<mask>", "fp32")
    assert callable(args.func)


def test_bad_data_exits_2_naming_the_line(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    data = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"text": "fine"}, '{"text": "oops"'])
    code = main(["--model", tiny_model_dir, "--task", "diffusion", "--data", data, "--output-dir",
                 str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    assert "bad.jsonl:3: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out" / "adapter").exists()


def _train(model, data, tmp_path, *extra) -> list[str]:
    return ["--model", model, "--task", "sft", "--data", data, "--output-dir", str(tmp_path / "out"),
            "--no-progress", "--max-steps", "1", *extra]


def test_unknown_attention_exits_2_before_loading(tmp_path, capsys):
    code = main(_train("no-such-model", "no-such.jsonl", tmp_path, "--attn", "bogus"))
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown attention 'bogus'" in err and "sdpa" in err


def test_missing_checkpoint_exits_2_naming_it(tmp_path, capsys):
    code = main(_train("no-such-model", "no-such.jsonl", tmp_path, "--resume", str(tmp_path / "nowhere")))
    assert code == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_mask_token_not_in_vocabulary_exits_2(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "one two three"}] * 4)
    code = main(["--model", tiny_model_dir, "--task", "diffusion", "--data", data, "--output-dir",
                 str(tmp_path / "out"), "--no-progress", "--mask-token", "<not-a-token>"])
    assert code == 2
    assert "mask token '<not-a-token>' is not in the tokenizer's vocabulary" in capsys.readouterr().err


def test_model_dir_without_tokenizer_exits_2(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    import shutil
    from pathlib import Path

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in Path(tiny_model_dir).glob("*.json"):
        if "token" not in f.name:
            shutil.copy(f, bare / f.name)
    for f in Path(tiny_model_dir).glob("*.safetensors"):
        shutil.copy(f, bare / f.name)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "one two three"}] * 4)
    code = main(_train(str(bare), data, tmp_path))
    assert code == 2
    err = capsys.readouterr().err
    assert str(bare) in err and "--gguf-file" not in err
    (bare / "model.Q4.gguf").write_bytes(b"")  # a GGUF model dir named without --gguf-file
    assert main(_train(str(bare), data, tmp_path)) == 2
    assert "it holds a GGUF file: name it with --gguf-file" in capsys.readouterr().err


def test_help_shows_the_defaults(capsys):
    import re

    import pytest

    with pytest.raises(SystemExit):
        main(["--help"])
    options = capsys.readouterr().out.split("options:", 1)[1]
    blocks = {b.split()[0]: " ".join(b.split()) for b in re.split(r"\n(?=  -)", options) if b.strip()}
    for option, default in [("--lr", "0.0002"), ("--tokens-per-batch", "2048"), ("--output-dir", "anymask-train"),
                            ("--lora-alpha", "32"), ("--warmup-steps", "0"), ("--backend", "auto")]:
        assert blocks[option].endswith(f"(default: {default})"), blocks[option]
    assert blocks["--dtype"].endswith("the same default on CPU and GPU) (default: bf16)")
    assert not any("(default: None)" in b or "(default: False)" in b for b in blocks.values())


def test_model_that_is_a_gguf_file_or_a_missing_path_exits_2(tmp_path, capsys):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert main(_train(str(gguf), "no-such.jsonl", tmp_path)) == 2
    assert f"is a GGUF file: give its directory as --model and the file name as --gguf-file (--model " \
           f"{str(tmp_path)!r} --gguf-file 'model.gguf')" in capsys.readouterr().err
    for missing in (str(tmp_path / "nowhere"), "./no/such/model", "~/no-such-model-dir"):
        assert main(_train(missing, "no-such.jsonl", tmp_path)) == 2
        assert f"model path {missing!r} does not exist" in capsys.readouterr().err


def test_model_path_with_a_tilde_is_expanded_and_a_hub_name_is_not_checked(tmp_path, monkeypatch):
    from anymask.train.config import check_model_path

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "tiny").mkdir()
    assert check_model_path("~/tiny") == str(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Org").mkdir()
    assert check_model_path("Org/Some-Model") == "Org/Some-Model"  # a hub name, even beside a folder Org/


def test_output_dir_that_cannot_be_created_exits_2_saying_so(tmp_path, capsys):
    """Not "cannot load MODEL": the output dir is made (and written to) before anything loads."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = main(_train("no-such-model", "no-such.jsonl", tmp_path, "--output-dir", str(blocker / "out")))
    assert code == 2
    err = capsys.readouterr().err
    assert f"anymask train: error: cannot create --output-dir {str(blocker / 'out')!r}: Not a directory" in err
    assert "cannot load" not in err
    assert main(_train("no-such-model", "no-such.jsonl", tmp_path, "--output-dir", str(blocker))) == 2
    assert f"cannot create --output-dir {str(blocker)!r}: it is a file" in capsys.readouterr().err


def test_output_file_that_cannot_be_written_exits_2_saying_so(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    (tmp_path / "out" / "metrics.jsonl").mkdir(parents=True)  # a directory where the run writes a file
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "one two", "completion": "three"}] * 4)
    assert main(_train(tiny_model_dir, data, tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"anymask train: cannot write to --output-dir {str(tmp_path / 'out')!r}: [Errno 21] Is a directory" in err
    assert "metrics.jsonl" in err and "cannot load" not in err


def test_seed_outside_64_bits_exits_2(tmp_path, capsys):
    assert main(_train("no-such-model", "no-such.jsonl", tmp_path, "--seed", "99999999999999999999")) == 2
    err = capsys.readouterr().err
    assert "anymask train: error: seed must be a 64-bit integer" in err and "Traceback" not in err


def test_summary_leaves_out_steps_without_a_loss():
    from anymask.train.cli import summary
    from anymask.train.loop import TrainResult

    result = TrainResult(history=[{"loss": None}, {"loss": 2.5}, {"loss": None}, {"loss": 1.25}, {"loss": None}],
                         adapter_dir="out/adapter", kernels="none")
    assert summary(result) == "trained 5 steps: loss 2.5000 -> 1.2500; adapter in out/adapter; kernels: none"
    result.history = [{"loss": None}]
    assert summary(result).startswith("trained 1 step: none had a loss unit;")
