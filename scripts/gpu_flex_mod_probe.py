"""Which mask_mod formulation keeps compiled flex fast at head dim 64 (GQA 32:8, S 16384, packed docs)?"""
import torch
from gpu_probe_common import cuda_ms as ms, packed_lengths
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

torch._dynamo.config.recompile_limit = 64
dev = torch.device("cuda")
cflex = torch.compile(flex_attention, dynamic=False)

S = 16384
lengths = packed_lengths(S)
ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(dev)
starts = torch.tensor([0] + lengths[:-1], device=dev).cumsum(0)
ends = starts + torch.tensor(lengths, device=dev) - 1
lo64 = starts[ids].unsqueeze(0); hi64 = ends[ids].unsqueeze(0)  # [1, S]
lo32, hi32 = lo64.int(), hi64.int()
valid = torch.ones(1, S, dtype=torch.bool, device=dev)
last = S - 1


def m_current(b, h, q, kv):
    qc = q.clamp(0, last); kc = kv.clamp(0, last)
    return (kv >= lo64[b, qc]) & (kv <= hi64[b, qc]) & valid[b, kc]


def m_int32_noclamp(b, h, q, kv):
    return (kv >= lo32[b, q]) & (kv <= hi32[b, q]) & valid[b, kv]


def m_int32_novalid(b, h, q, kv):
    return (kv >= lo32[b, q]) & (kv <= hi32[b, q])


def m_int64_novalid(b, h, q, kv):
    return (kv >= lo64[b, q]) & (kv <= hi64[b, q])


def m_ids(b, h, q, kv):
    return ids[q] == ids[kv]


base = create_block_mask(m_ids, 1, None, S, S, device=dev)
mods = dict(ids=m_ids, current=m_current, int32_noclamp=m_int32_noclamp, int32_novalid=m_int32_novalid,
            int64_novalid=m_int64_novalid)
for H, KV, D, grad in [(32, 8, 64, True), (32, 8, 128, False), (16, 16, 128, False)]:
    q = torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16, requires_grad=grad)
    k = torch.randn(1, KV, S, D, device=dev, dtype=torch.bfloat16, requires_grad=grad)
    v = torch.randn(1, KV, S, D, device=dev, dtype=torch.bfloat16, requires_grad=grad)
    do = torch.randn_like(q)
    row = {}
    for name, mod in mods.items():
        bm = BlockMask.from_kv_blocks(base.kv_num_blocks, base.kv_indices, base.full_kv_num_blocks,
                                      base.full_kv_indices, BLOCK_SIZE=base.BLOCK_SIZE, mask_mod=mod,
                                      seq_lengths=base.seq_lengths)
        try:
            f = lambda: cflex(q, k, v, block_mask=bm, enable_gqa=True)
            row[name] = ms(f)
            if grad:
                row[name + "_fb"] = ms(lambda: torch.autograd.grad(f(), (q, k, v), do))
        except Exception as exc:
            row[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
    print(f"H{H}:{KV} D{D}", row, flush=True)
