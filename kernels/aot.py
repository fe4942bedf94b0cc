"""Ahead-of-time compilation of every kernel for real GPUs, without one.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` lowers a kernel to PTX and a
cubin for Hopper (sm_90; sm_80 and sm_100 likewise); the cuobjdump shipped with Triton reads the
registers and stack (spill) bytes of each. ``python -m kernels.aot`` prints the table that
kernels/README.md records."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def all_specs(dtype: str = "bf16") -> list[tuple]:
    from kernels import grouped_gemm, masked_cross_entropy_triton, token_dispatch

    return grouped_gemm.aot_specs(dtype) + token_dispatch.aot_specs(dtype) + masked_cross_entropy_triton.aot_specs(dtype)


def compile_spec(spec, arch: int = 90):
    name, fn, signature, constexprs, num_warps, num_stages = spec
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages})


def resource_usage(compiled) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)", out)
    if not m:
        raise RuntimeError(f"cuobjdump gave no resource line: {out[:300]}")
    return {"registers": int(m.group(1)), "stack_bytes": int(m.group(2)),
            "shared_bytes": compiled.metadata.shared, "wgmma": "wgmma" in compiled.asm["ptx"]}


def main(arch: int = 90) -> int:
    print(f"| kernel (bf16, sm_{arch}) | warps | stages | registers | spill stack (B) | shared (B) | wgmma |")
    print("|---|---|---|---|---|---|---|")
    for spec in all_specs():
        r = resource_usage(compile_spec(spec, arch))
        print(f"| {spec[0]} | {spec[4]} | {spec[5]} | {r['registers']} | {r['stack_bytes']} | {r['shared_bytes']} | "
              f"{'yes' if r['wgmma'] else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
