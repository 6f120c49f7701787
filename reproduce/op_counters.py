"""fvcore op handles for the ops that fvcore skips but our counting conventions count.

fvcore's `FlopCountAnalysis` counts one multiply-add as one "flop" (so its totals are MACs) and
silently skips ops it has no handle for. Two conventions of the suite add handles on top of it:

`fvcore+attn` — `ATTENTION_HANDLES`
    `aten::scaled_dot_product_attention` = the two matmuls of attention,
    `B·H·Nq·Nk·d` (q @ kᵀ) + `B·H·Nq·Nk·dv` (attn @ v) MACs; softmax and scaling are not counted,
    as fvcore counts no element-wise op. This is the count PVT's `get_flops.py` adds by hand to
    mmcv's total (`sra_flops = 2·hw·(h/r)(w/r)·dim`).

`fvcore+fft` — `FFT_HANDLES`, the GFNet authors' convention
    `aten::fft_rfft2`, `aten::fft_irfft2`: an FFT over N points counts `N·⌈log2 N⌉` per channel,
    where N is the number of points of the transformed dims *of the op's input* (for irfft2 that
    is the half spectrum H·(W/2+1)). This is `rfft_flop_jit` of the authors' own counter
    (raoyongming/DynamicViT `calc_flops.py`, reused in raoyongming/HorNet), which their GFNet
    README numbers come from. Unlike theirs (batch 1 only) we also multiply by the batch.
    `aten::mul` on complex tensors (the global filter's element-wise product) counts one per
    complex output element: the `+ HWD` term of the GFNet paper's complexity `HWD⌈log2 HW⌉ + HWD`.
    The authors' counter leaves it out; it adds < 0.01 G to any GFNet at 224. Real-valued `mul`
    stays uncounted, as in plain fvcore.

`torch.fft.rfft2`/`irfft2` trace to exactly `aten::fft_rfft2`/`aten::fft_irfft2` (checked with
`torch.jit.trace` on torch 2.13); `torch.view_as_complex` traces to a view, which costs nothing.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence

from fvcore.nn.jit_handles import get_shape


def _prod(values: Sequence[int]) -> int:
    return math.prod(int(v) for v in values)


def _constant_int_list(value: Any) -> Optional[List[int]]:
    """The value of a traced int-list argument (a constant or a ListConstruct of constants)."""
    constant = value.toIValue()
    if constant is not None:
        return [constant] if isinstance(constant, int) else list(constant)
    node = value.node()
    if node.kind() == "prim::ListConstruct":
        items = [item.toIValue() for item in node.inputs()]
        if all(isinstance(item, int) for item in items):
            return items
    return None


def fft_2d_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """`aten::fft_rfft2` / `aten::fft_irfft2(self, s, dim, norm)`: N·⌈log2 N⌉ per transformed signal."""
    shape = get_shape(inputs[0])
    dims = _constant_int_list(inputs[2]) if len(inputs) > 2 else None
    dims = dims or [-2, -1]  # torch's default for the 2-D transforms
    points = _prod(shape[d] for d in dims)
    signals = _prod(shape) // points  # batch × channels: one 2-D transform each
    return signals * points * math.ceil(math.log2(points)) if points > 1 else 0


def complex_mul_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """`aten::mul`: one per output element when an operand is complex (the global filter), else 0."""
    def is_complex(value: Any) -> bool:
        scalar_type = getattr(value.type(), "scalarType", lambda: None)()
        return scalar_type is not None and scalar_type.startswith("Complex")

    if not any(is_complex(value) for value in inputs[:2]):
        return 0
    return _prod(get_shape(outputs[0]))


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """`aten::scaled_dot_product_attention(q, k, v, ...)`: the q·kᵀ and attn·v matmuls, in MACs."""
    query, key, value = (get_shape(v) for v in inputs[:3])
    *batch, queries, head_dim = query
    keys = key[-2]
    value_dim = value[-1]
    return _prod(batch) * queries * keys * (head_dim + value_dim)


ATTENTION_HANDLES = {
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
}

FFT_HANDLES = {
    "aten::fft_rfft2": fft_2d_flop_jit,
    "aten::fft_irfft2": fft_2d_flop_jit,
    "aten::mul": complex_mul_flop_jit,
}
