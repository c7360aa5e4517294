"""Isolate a slow anymask flex forward (GQA / head dim 64) against a hand-rolled create_block_mask."""
import torch
from gpu_probe_common import cuda_ms as ms, packed_lengths
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
import anymask
from anymask import masks
from anymask.backend import get
from anymask.problem import describe

dev = torch.device("cuda")
cflex = torch.compile(flex_attention, dynamic=False)


def stats(bm):
    t = [bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices, bm.q_num_blocks, bm.full_q_num_blocks]
    return [(tuple(x.shape), str(x.dtype).replace("torch.", ""), int(x.sum()) if x.dim() < 4 else x.is_contiguous()) if x is not None else None for x in t] + [bm.BLOCK_SIZE, bm.seq_lengths]


S = 16384
lengths = packed_lengths(S)
ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(dev)
m = masks.documents(ids.unsqueeze(0))
raw_bm = create_block_mask(lambda b, h, qi, ki: ids[qi] == ids[ki], 1, None, S, S, device=dev)
flex_backend = get("flex")
for H, KV, D in [(32, 8, 64), (32, 32, 64), (32, 8, 128), (16, 16, 128), (16, 4, 128)]:
    q = torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, KV, S, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, KV, S, D, device=dev, dtype=torch.bfloat16)
    p = describe(q, k, v, m, None)
    plan = flex_backend.plan(p)
    ours_bm = plan.block_mask
    row = {"raw": ms(lambda: cflex(q, k, v, block_mask=raw_bm, enable_gqa=True)),
           "ours": ms(lambda: anymask.attention(q, k, v, m, backend="flex")),
           "ours_bm_direct": ms(lambda: cflex(q, k, v, block_mask=ours_bm, enable_gqa=True)),
           "ours_bm_raw_mod": ms(lambda: cflex(q, k, v, block_mask=BlockMask.from_kv_blocks(
               ours_bm.kv_num_blocks, ours_bm.kv_indices, ours_bm.full_kv_num_blocks, ours_bm.full_kv_indices,
               BLOCK_SIZE=ours_bm.BLOCK_SIZE, mask_mod=raw_bm.mask_mod, seq_lengths=ours_bm.seq_lengths), enable_gqa=True)),
           "raw_bm_our_mod": ms(lambda: cflex(q, k, v, block_mask=BlockMask.from_kv_blocks(
               raw_bm.kv_num_blocks, raw_bm.kv_indices, raw_bm.full_kv_num_blocks, raw_bm.full_kv_indices,
               BLOCK_SIZE=raw_bm.BLOCK_SIZE, mask_mod=ours_bm.mask_mod, seq_lengths=raw_bm.seq_lengths), enable_gqa=True)),
           "sdpa_nomask": ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)),
           }
    print(f"H{H}:{KV} D{D}", row, flush=True)
print("raw ", stats(raw_bm))
print("ours", stats(ours_bm))
