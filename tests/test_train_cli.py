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
