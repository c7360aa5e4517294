"""The four training tasks: which mask each needs and how its loss is computed.

Every task sees one packed row (:class:`~anymask.train.packing.Packed`) and returns the **sum** of
its loss over the row's loss units; the loop divides by the number of units in the whole global
batch (``count``), so accumulation and data parallelism weigh every unit the same::

    task        mask (inside each document)            loss unit        loss
    sft         causal                                 completion token next-token cross-entropy
    prefix_lm   prompt bidirectional, completion causal completion token next-token cross-entropy
    embedding   bidirectional                          query            InfoNCE, in-batch negatives
    diffusion   bidirectional                          token            masked-token CE weighted 1/t

Documents never see each other: ``anymask.hf`` isolates them from the ``position_ids`` resets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import masks as M
from .config import ConfigError
from .packing import Packed

DIFFUSION_EPS = 1e-3  # LLaDA: mask probability p = (1 - eps) * t + eps, t ~ U(0, 1)


class Task:
    """Base class: ``spec`` is the ``anymask.hf.set_mask`` policy for the whole run."""

    name = ""
    spec = "causal"

    def base_mask(self, batch: Packed) -> M.Mask:
        """The mask inside documents (documents are added separately)."""
        return M.causal() if self.spec == "causal" else M.full()

    def mask(self, batch: Packed) -> M.Mask:
        """The row's full mask, documents included (for explicit-mask baselines and tests)."""
        return M.documents(batch.doc_ids) & self.base_mask(batch)

    def call_kwargs(self, batch: Packed) -> dict:
        """Per-call keyword arguments for a model under ``attn_implementation="anymask"``."""
        return {}

    def count(self, batch: Packed) -> int:
        """Loss units in ``batch`` (known before the forward)."""
        raise NotImplementedError

    def loss_sum(self, model, batch: Packed, attn_kwargs: dict, fused_head: bool = False) -> torch.Tensor:
        """Sum of the loss over the units of ``batch`` (a float32 scalar); ``fused_head``: the LM
        head and its cross-entropy through Liger's fused kernel (see :mod:`anymask.train.fused`)."""
        raise NotImplementedError


def token_ce_sum(model, batch: Packed, keep: torch.Tensor, target: torch.Tensor, attn_kwargs: dict, *,
                 input_ids: torch.Tensor | None = None, token_weight: torch.Tensor | None = None,
                 fused_head: bool = False) -> torch.Tensor:
    """``sum_i w_i * CE(logits at row position keep[i], target[i])`` (float32 scalar), computing
    the head only at ``keep`` (``[n]``): ``logits_to_keep`` gives ``[n, V]`` logits, or with
    ``fused_head`` Liger's fused linear cross-entropy takes the hidden states and never makes them."""
    ids = batch.input_ids if input_ids is None else input_ids
    if fused_head:
        from .fused import linear_cross_entropy_sum

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = base.get_decoder()(input_ids=ids, position_ids=batch.position_ids, use_cache=False,
                                    **attn_kwargs).last_hidden_state[0]  # [S, H]
        return linear_cross_entropy_sum(hidden[keep], base.get_output_embeddings().weight, target, token_weight)
    out = model(input_ids=ids, position_ids=batch.position_ids, logits_to_keep=keep, use_cache=False, **attn_kwargs)
    ce = F.cross_entropy(out.logits[0].float(), target, reduction="none")  # [n]
    return (ce if token_weight is None else ce * token_weight).sum()


class SFT(Task):
    """Causal LM on the completion only (the prompt is context, not target)."""

    name, spec = "sft", "causal"
    units = "a completion token is a loss unit: were the completions truncated away? raise --tokens-per-batch"

    @staticmethod
    def positions(batch: Packed) -> torch.Tensor:
        """Row positions whose next token is a completion token of the same document."""
        same = batch.doc_ids[0, 1:] == batch.doc_ids[0, :-1]  # [S-1]
        target_is_completion = ~batch.prompt[0, 1:]
        return (same & target_is_completion).nonzero().squeeze(1)  # [n]

    def count(self, batch):
        return int(self.positions(batch).numel())

    def loss_sum(self, model, batch, attn_kwargs, fused_head=False):
        keep = self.positions(batch)
        return token_ce_sum(model, batch, keep, batch.input_ids[0, keep + 1], attn_kwargs, fused_head=fused_head)


class PrefixLM(SFT):
    """Like ``sft``, but the prompt attends bidirectionally within itself::

        prompt p p p, completion c c (one document)
             p p p c c
        p    # # # . .
        p    # # # . .
        p    # # # . .
        c    # # # # .
        c    # # # # #

    The prefix is per document, so the mask is ``causal | same prompt`` (prompt tokens of one
    document share a group id; completion tokens are each their own group).
    """

    name, spec = "prefix_lm", "causal"

    def base_mask(self, batch):
        pos = torch.arange(batch.num_tokens, device=batch.doc_ids.device)
        group = torch.where(batch.prompt[0], batch.doc_ids[0], -1 - pos)  # [S]
        return M.causal() | M.documents(group.unsqueeze(0))

    def call_kwargs(self, batch):
        return {"anymask_mask": self.base_mask(batch)}


class Embedding(Task):
    """Bidirectional encoder: mean-pooled documents, InfoNCE with in-batch negatives.

    Documents come in pairs (query ``2k``, positive ``2k + 1``); the other positives of the
    packed row are the negatives, except those with the same tokens as the query's own positive
    or whose query has the same tokens as this one (a duplicate is no negative: counting it would
    push the query away from its own answer).
    Similarities are cosines divided by ``temperature``::

        positives  P0  P1  P2(= P0's text)
        query 0    +   -   x        + positive, - negative, x left out
        query 1    -   +   -
        query 2    x   -   +
    """

    name, spec = "embedding", "bidirectional"
    units = "a row of 2+ (query, document) pairs is a loss unit: raise --tokens-per-batch so pairs share a row"

    def __init__(self, temperature: float = 0.05):
        self.temperature = temperature

    def count(self, batch):
        pairs = len(batch.doc_lengths) // 2
        return pairs if pairs > 1 else 0  # one pair alone has no negative: nothing to learn

    def embed(self, model, batch: Packed, attn_kwargs: dict) -> torch.Tensor:
        """Mean-pooled last hidden state per document: ``[num_docs, hidden]`` float32."""
        decoder = model.get_base_model().get_decoder() if hasattr(model, "get_base_model") else model.get_decoder()
        hidden = decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                         **attn_kwargs).last_hidden_state[0].float()  # [S, H]
        n = len(batch.doc_lengths)
        sums = hidden.new_zeros(n, hidden.shape[-1]).index_add_(0, batch.doc_ids[0], hidden)  # [D, H]
        lengths = torch.tensor(batch.doc_lengths, device=hidden.device, dtype=hidden.dtype)
        return sums / lengths[:, None]

    def loss_sum(self, model, batch, attn_kwargs, fused_head=False):  # no LM head: fused_head has no effect
        emb = F.normalize(self.embed(model, batch, attn_kwargs), dim=-1)  # [2P, H]
        queries, positives = emb[0::2], emb[1::2]  # [P, H] each
        logits = queries @ positives.T / self.temperature  # [P, P]
        labels = torch.arange(logits.shape[0], device=logits.device)
        if batch.same_as:
            text = torch.tensor(batch.same_as, device=logits.device)  # [2P] text id per document
            same = lambda ids: ids[:, None] == ids[None, :]  # noqa: E731  [P, P]
            duplicate = (same(text[1::2]) | same(text[0::2])) & (labels[:, None] != labels[None, :])
            logits = logits.masked_fill(duplicate, float("-inf"))
        return F.cross_entropy(logits, labels, reduction="sum") * (logits.shape[0] > 1)


class Diffusion(Task):
    """LLaDA-style masked diffusion: per document ``t ~ U(0, 1)``, each token replaced by the mask
    token with probability ``t``; cross-entropy at masked positions weighted ``1 / t``; the unit is
    a token, so the loss is the LLaDA estimate summed over tokens / tokens.  The masking is drawn
    from ``batch.seed``: the same row always gets the same masks (resume, any world size)."""

    name, spec = "diffusion", "bidirectional"
    units = "every token is a loss unit"

    def __init__(self, mask_token_id: int):
        self.mask_token_id = int(mask_token_id)

    def count(self, batch):
        return batch.num_tokens

    def noise(self, batch: Packed) -> tuple[torch.Tensor, torch.Tensor]:
        """``(masked [S] bool, p [S] mask probability of each token's document)``, drawn on the CPU."""
        gen = torch.Generator().manual_seed(batch.seed)
        t = torch.rand(len(batch.doc_lengths), generator=gen)  # [D]
        p = ((1 - DIFFUSION_EPS) * t + DIFFUSION_EPS)[batch.doc_ids[0].cpu()]  # [S]
        masked = torch.rand(batch.num_tokens, generator=gen) < p
        device = batch.input_ids.device
        return masked.to(device), p.to(device)

    def loss_sum(self, model, batch, attn_kwargs, fused_head=False):
        masked, p = self.noise(batch)
        keep = masked.nonzero().squeeze(1)  # [n]
        noisy = torch.where(masked, torch.full_like(batch.input_ids[0], self.mask_token_id), batch.input_ids[0])
        return token_ce_sum(model, batch, keep, batch.input_ids[0, keep], attn_kwargs, input_ids=noisy.unsqueeze(0),
                            token_weight=1.0 / p[keep], fused_head=fused_head)


def make(name: str, *, tokenizer=None, temperature: float = 0.05, mask_token: str | None = None,
         mask_token_id: int | None = None) -> Task:
    """The task called ``name``; diffusion resolves its mask token from the arguments or tokenizer."""
    if name == "sft":
        return SFT()
    if name == "prefix_lm":
        return PrefixLM()
    if name == "embedding":
        return Embedding(temperature)
    if name == "diffusion":
        return Diffusion(resolve_mask_token(tokenizer, mask_token, mask_token_id))
    raise ConfigError(f"unknown task {name!r}")


def resolve_mask_token(tokenizer, mask_token: str | None = None, mask_token_id: int | None = None) -> int:
    """The diffusion mask token: explicit id, explicit token, else the tokenizer's mask, unk or pad
    token (the first it has).  Never the EOS token, which ends every document: a masked position
    and a real end of document would be the same input (Llama 3 has none of the three; Qwen 2.5's
    pad is its EOS)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if mask_token_id is not None:
        return _not_eos(int(mask_token_id), eos, f"mask_token_id {mask_token_id}")
    if tokenizer is None:
        raise ConfigError("diffusion needs a mask token: pass mask_token_id (or a tokenizer)")
    if mask_token is not None:
        ids = tokenizer.convert_tokens_to_ids([mask_token])
        if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id and mask_token != tokenizer.unk_token:
            raise ConfigError(f"mask token {mask_token!r} is not in the tokenizer's vocabulary")
        return _not_eos(int(ids[0]), eos, f"--mask-token {mask_token!r}")
    for attr in ("mask_token_id", "unk_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None and value != eos:
            return int(value)
    raise ConfigError("the tokenizer has no mask, unk or pad token other than its EOS token (which ends every "
                      "document, so it cannot also mark masked positions); pass --mask-token with a token the "
                      "data never uses, e.g. a reserved special token such as '<|reserved_special_token_0|>'")


def _not_eos(token_id: int, eos: int | None, what: str) -> int:
    if token_id == eos:
        raise ConfigError(f"{what} is the EOS token, which ends every diffusion document: masked positions and "
                          "real ends of documents would look the same; pick a token the data never uses")
    return token_id
