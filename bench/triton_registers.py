"""Registers a thread of the Triton reduce kernel's variants on sm_90, without a GPU: each variant
goes through Triton's whole pipeline (as tests/test_triton_compile.py compiles them), specialized
as a launch on aligned tensors would be (pointers, row strides and cols divisible by 16), and its
cubin's resource usage is read with the cuobjdump Triton ships.

    TRITON_DEFAULT_FP_FUSION=1 python bench/triton_registers.py [BLOCK_R/BLOCK_C/WARPS ...] [--dtype bf16]

Programs a SM: 65536 registers / (registers rounded up to 8 x 32 lanes x warps).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastnorm.triton_kernels import running_norm as k

POINTERS = {"x_ptr": "*{x}", "out_ptr": "*{x}", "mask_ptr": "*u8", "steps_ptr": "*i64"}
SIZES = {"x_row_stride", "out_row_stride", "mask_cols", "mask_group", "rows", "cols", "rows_per_split"}
ALIGNED = {"x_row_stride", "out_row_stride", "cols"}
BASE = dict(HAS_SCALE=False, scale_ptr=None, HAS_STEPS=False, steps_ptr=None, table_ptr=None, HAS_MASK=False,
            mask_ptr=None, SPLIT=True, split_clipped_ptr=None)
UPDATED = dict(BASE, UPDATE=True, WITH_OUTPUT=True, PREVIOUS=False)
VARIANTS = {
    "moments": dict(BASE, UPDATE=False, WITH_OUTPUT=False, PREVIOUS=False, out_ptr=None, mean_ptr=None, var_ptr=None,
                    count_ptr=None, diag_ptr=None),
    "split updated": UPDATED,
    "split previous": dict(UPDATED, PREVIOUS=True, split_clipped_ptr=0),
    "split previous, mask": dict(UPDATED, PREVIOUS=True, split_clipped_ptr=0, HAS_MASK=True, mask_ptr=0),
    "one split updated": dict(UPDATED, SPLIT=False, partials_ptr=None),
}


def resource_usage(kernel, x: str, constants: dict, num_warps: int) -> tuple[int, int]:
    """Registers a thread and stack bytes of kernel for x's dtype (a Triton type name)."""
    signature, values = {}, {}
    for p in kernel.params:
        if p.is_constexpr or constants.get(p.name, 0) is None:
            signature[p.name], values[p.name] = "constexpr", constants[p.name]
        elif p.name.endswith("_ptr"):
            signature[p.name] = POINTERS.get(p.name, "*fp64").format(x=x)
        else:
            signature[p.name] = "i32" if p.name in SIZES else "fp64"
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params)
             if signature[p.name] != "constexpr" and (signature[p.name].startswith("*") or p.name in ALIGNED)}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=values, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True).stdout
    return int(re.search(r"REG:(\d+)", report).group(1)), int(re.search(r"STACK:(\d+)", report).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("blocks", nargs="*", default=["32/64/4"], help="BLOCK_R/BLOCK_C/WARPS")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "fp64"])
    args = parser.parse_args()
    acc = tl.float64 if args.dtype == "fp64" else tl.float32
    print("| BLOCK_R | BLOCK_C | warps | variant | registers | stack (B) | programs a SM |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.blocks:
        block_r, block_c, warps = (int(v) for v in spec.split("/"))
        for name, variant in VARIANTS.items():
            regs, stack = resource_usage(k._reduce_kernel, args.dtype,
                                         dict(variant, ACC=acc, BLOCK_R=block_r, BLOCK_C=block_c), warps)
            programs = 65536 // ((regs + 7) // 8 * 8 * 32 * warps)
            print(f"| {block_r} | {block_c} | {warps} | {name} | {regs} | {stack} | {programs} |", flush=True)


if __name__ == "__main__":
    main()
