"""Element offsets in 64 bits, for every kernel.

A row index times a row width is an element offset; Triton computes it in the type of its
operands, and a program id or a loaded int32 index is 32-bit. At the 30B-A3B shapes a product
passes 2^31 soon: 1,048,576 received rows x hidden 2048 (four times the rows of one micro-batch
of 8 x 4096 x top-8 per EP rank, or twice that with complementary masking, or H 4096), or
1,048,576 supervised rows x H 2048 in the loss. In 32 bits the offset wraps and the kernel reads
and writes someone else's memory. Every ``row * width`` in the kernels goes through ``row_offset``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_offset(row, width):
    """``row * width`` as int64, whatever the types of ``row`` (scalar or block) and ``width``."""
    return row.to(tl.int64) * width
