"""On the GPU: lowtune's varlen attention with grouped key/value heads equals SDPA's, record by record.

python bench/check_varlen_gqa.py       # prints the largest difference; exits 1 past bf16 rounding
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from lowtune.model.attention import varlen_attention_forward


def main() -> None:
    torch.manual_seed(0)
    lengths, heads, kv_heads, dim = [37, 100, 5], 8, 2, 64
    total = sum(lengths)
    query = torch.randn(1, heads, total, dim, device="cuda", dtype=torch.bfloat16)
    key, value = (torch.randn(1, kv_heads, total, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    out, _ = varlen_attention_forward(
        None, query, key, value, None, None, 0.0, bounds, bounds, max(lengths), max(lengths)
    )
    worst = 0.0
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        piece = [t[:, :, start:end] for t in (query, key, value)]
        expected = F.scaled_dot_product_attention(*piece, is_causal=True, enable_gqa=True).transpose(1, 2)
        worst = max(worst, (out[:, start:end] - expected).abs().max().item())
    print(
        f"varlen attention with {heads} query and {kv_heads} key/value heads: largest difference from SDPA {worst:.2e}"
    )
    sys.exit(0 if worst < 2e-2 else 1)


if __name__ == "__main__":
    main()
