"""``anymask train``: LoRA fine-tuning of Hugging Face decoders with the mask each task needs.

::

    from anymask.train import TrainConfig, train
    result = train(TrainConfig(model="path/to/model", task="embedding", data="pairs.jsonl"))

Tasks: ``sft`` (causal, loss on completions), ``prefix_lm`` (bidirectional prompt, causal
completion), ``embedding`` (bidirectional, mean pooling, InfoNCE), ``diffusion`` (bidirectional,
LLaDA-style masked tokens).  Examples are packed into fixed-token rows whose documents never see
each other.  transformers and peft are imported only when a run starts.
"""

from .config import TASKS, TrainConfig
from .data import DataError


def train(config: TrainConfig, **kwargs):
    """Run one training job; see :func:`anymask.train.loop.train`."""
    from .loop import train as _train

    return _train(config, **kwargs)


def load_adapter(model_path: str, adapter_dir: str, **kwargs):
    """Base model + saved LoRA adapter for inference; see :func:`anymask.train.model.load_adapter`."""
    from .model import load_adapter as _load

    return _load(model_path, adapter_dir, **kwargs)


__all__ = ["TASKS", "DataError", "TrainConfig", "load_adapter", "train"]
