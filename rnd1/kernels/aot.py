"""Ahead-of-time compilation of every kernel for real GPUs, without one, specialised the way
the JIT specialises a launch.

A launch ``kernel[grid](*args)`` does not compile the bare signature: Triton's JIT marks pointer
and integer arguments divisible by 16 (``tt.divisibility``), turns integers equal to 1 (unit
strides) into constants, and only then lowers. That specialisation is what lets the compiler
vectorise loads, use ``cp.async``/TMA and pipeline the K loop; compiling without it describes a
kernel the GPU never runs. So each spec here carries *sample arguments* (tensor stand-ins with
aligned pointers and real shapes/strides, and the real integers at Qwen3-30B-A3B per-rank
shapes), and :func:`jit_specialization` runs them through the JIT's own binder
(``create_function_from_signature`` + ``JITFunction._pack_args``) with the backend of the
*target* GPU, giving the signature, constexprs and attrs a launch on that GPU would compile.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` then lowers to PTX and a
cubin (sm_90; sm_100 likewise); the ``cuobjdump`` shipped with Triton reads registers and stack
bytes and disassembles the SASS, where spills are local-memory stores (``STL``).
``python -m rnd1.kernels.aot [arch]`` prints the table that rnd1/kernels/README.md records.

Spec format: ``(name, fn, args, constexprs, num_warps, num_stages)``; ``args`` maps each
non-constexpr parameter to a sample value (``SampleTensor`` or int). A legacy spec whose
``args`` are type strings (``"*bf16"``, ``"i32"``) is compiled with aligned pointers and
unspecialised integers, and reported as such."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature


class SampleTensor:
    """What the JIT's binder reads from a tensor argument: dtype and data_ptr (16-byte aligned,
    as every fresh CUDA allocation is), plus the shape whose strides the spec passes."""

    def __init__(self, dtype: torch.dtype, shape=(1,)):
        self.dtype, self.shape = dtype, tuple(shape)

    def stride(self, dim: int | None = None):
        st, acc = [], 1
        for size in reversed(self.shape):
            st.append(acc)
            acc *= size
        st = tuple(reversed(st))
        return st if dim is None else st[dim]

    @staticmethod
    def data_ptr() -> int:
        return 1 << 20  # any multiple of 16


# Largest dynamic shared memory one block may opt into (227 KiB on H100 and B200).
MAX_SHARED_BYTES = 232448

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def all_specs(dtype: str = "bf16") -> list[tuple]:
    from rnd1.kernels import grouped_gemm, masked_cross_entropy_triton, token_dispatch

    return grouped_gemm.aot_specs(dtype) + token_dispatch.aot_specs(dtype) + masked_cross_entropy_triton.aot_specs(dtype)


def _is_legacy(args: dict) -> bool:
    return all(isinstance(v, str) for v in args.values())


def jit_specialization(fn, args: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int):
    """(signature, constexprs, attrs, options) exactly as ``fn[grid](**args, **constexprs)``
    would compile them on a GPU of ``arch``."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {"num_warps": num_warps, "num_stages": num_stages}
    bound, specialization, opts = binder(**args, **constexprs, **kwargs)
    options, signature, ce, attrs = fn._pack_args(backend, opts, bound, specialization, opts)
    return signature, ce, attrs, options


def compile_spec(spec, arch: int = 90):
    name, fn, args, constexprs, num_warps, num_stages = spec
    target = GPUTarget("cuda", arch, 32)
    if _is_legacy(args):  # type strings only: pointers aligned (fresh allocations), ints unknown
        signature = {**args, **{k: "constexpr" for k in constexprs}}
        names = list(fn.arg_names)
        attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, v in args.items() if v.startswith("*")}
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        return triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
    signature, ce, attrs, options = jit_specialization(fn, args, constexprs, num_warps, num_stages, arch)
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=ce, attrs=attrs), target=target,
                          options=options.__dict__)


def _cuobjdump(flag: str, cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True).stdout


def resource_usage(compiled) -> dict:
    cubin, ptx = compiled.asm["cubin"], compiled.asm["ptx"]
    out = _cuobjdump("--dump-resource-usage", cubin)
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)", out)
    if not m:
        raise RuntimeError(f"cuobjdump gave no resource line: {out[:300]}")
    sass = _cuobjdump("-sass", cubin)
    return {
        "registers": int(m.group(1)),
        "stack_bytes": int(m.group(2)),
        "spill_stores": len(re.findall(r"\bSTL(\.\w+)*\b", sass)),  # local-memory stores = spills
        "shared_bytes": compiled.metadata.shared,
        "fits_shared": compiled.metadata.shared <= MAX_SHARED_BYTES,
        "num_stages": compiled.metadata.num_stages,
        "wgmma": "wgmma.mma_async" in ptx,
        "tcgen05": "tcgen05.mma" in ptx,
        "cp_async": "cp.async.cg" in ptx or "cp.async.ca" in ptx,
        "tma": "cp.async.bulk.tensor" in ptx,
    }


def report_rows(arch: int = 90, dtype: str = "bf16") -> list[dict]:
    rows = []
    for spec in all_specs(dtype):
        r = resource_usage(compile_spec(spec, arch))
        rows.append({"name": spec[0], "warps": spec[4], "specialised": not _is_legacy(spec[2]), **r})
    return rows


def main(arch: int = 90) -> int:
    mma = "tcgen05" if arch >= 100 else "wgmma"
    yn = lambda b: "yes" if b else "no"  # noqa: E731
    for dtype in ("bf16", "fp32"):
        print(f"| kernel ({dtype}, sm_{arch}) | warps | stages | registers | spill stores | stack (B) | shared (B) | "
              f"{mma} | cp.async | TMA | JIT-specialised |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in report_rows(arch, dtype):
            print(f"| {r['name']} | {r['warps']} | {r['num_stages']} | {r['registers']} | {r['spill_stores']} | "
                  f"{r['stack_bytes']} | {r['shared_bytes']} | {yn(r[mma])} | {yn(r['cp_async'])} | {yn(r['tma'])} | "
                  f"{'yes' if r['specialised'] else 'pointers only'} |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
