"""The Triton kernels through Triton's whole pipeline (TTIR, TTGIR, LLVM, PTX, ptxas) to machine
code for the GPUs users have, without a GPU: a kernel that only ever ran in the interpreter may
not compile. For sm_80 (A100) and sm_90 (H100, H200): every kernel in every dtype of x, with the
blocks its launcher chooses for a large x and every optional input present, in both modes
(normalize_with "updated" and "previous"), and the variants the launchers also take (no mask, no
split, moments only, no output, no diagnostics, y from the statistics or from the y table).

One subprocess per architecture (Triton's compiler must not see TRITON_INTERPRET, and each run
gets its own empty cache, so nothing is served from an earlier compile).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from fastnorm.triton_backend import INTERPRETED, TRITON_ERROR

SCRIPT = textwrap.dedent("""
    import sys
    import torch, triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastnorm.triton_kernels import advantages as a, running_norm as k

    ARCH = int(sys.argv[1])
    DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
    POINTERS = {"x_ptr": "*{x}", "out_ptr": "*{x}", "mask_ptr": "*u8", "arrivals_ptr": "*i32", "steps_ptr": "*i64"}
    SIZES = {"x_row_stride", "out_row_stride", "mask_cols", "mask_group", "rows", "cols", "rows_per_split",
             "num_parts", "num_tables", "outer", "groups", "inner", "i_blocks", "steps", "steps_per_split"}

    def compile_kernel(kernel, x, constants, num_warps=4):
        '''The PTX of kernel for x's dtype (a Triton type name) on ARCH; constants: the constexprs,
        and None for each pointer the variant passes as None (0: a pointer a base dict left out is present).'''
        signature, values = {}, {}
        for p in kernel.params:
            if p.is_constexpr or constants.get(p.name, 0) is None:
                signature[p.name], values[p.name] = "constexpr", constants[p.name]
            elif p.name.endswith("_ptr"):
                signature[p.name] = POINTERS.get(p.name, "*fp64").format(x=x)
            elif p.name in SIZES:
                signature[p.name] = "i32"
            else:  # a float: Triton would pass a Python float as float32 without the annotation
                assert p.annotation_type == "fp64", (kernel.fn.__name__, p.name, p.annotation_type)
                signature[p.name] = "fp64"
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=values),
                                  target=GPUTarget("cuda", ARCH, 32), options={"num_warps": num_warps})
        assert f".target sm_{ARCH}" in compiled.asm["ptx"], (kernel.fn.__name__, x)
        assert compiled.asm["cubin"], (kernel.fn.__name__, x)
        return compiled.asm["ptx"]

    def every_kernel_in(x):
        '''Every kernel with the blocks its launcher picks for x of dtype x (65536 rows of 512 columns;
        (4096, 16, 16) advantages), split over 264 programs, with every optional input present; the
        kernels that finish a call in one launch (one split) in both modes.'''
        size = DTYPES[x].itemsize
        acc = k.acc_type(DTYPES[x])
        b = k.choose_blocks(65536, 512, size, programs=264)
        tiles = dict(ACC=acc, BLOCK_R=b.rows, BLOCK_C=b.cols)
        split = dict(tiles, HAS_MASK=True, HAS_SCALE=True, UPDATE=True, WITH_OUTPUT=True, SPLIT=True,
                     HAS_STEPS=False, steps_ptr=None, table_ptr=None)
        for previous in (True, False):
            ptx = compile_kernel(k._reduce_kernel, x, dict(split, PREVIOUS=previous,
                                                           split_clipped_ptr=None if not previous else 0), b.num_warps)
            assert "atom." not in ptx, x  # the splits' tables are merged by the next launch
            compile_kernel(k._reduce_kernel, x, dict(split, PREVIOUS=previous, SPLIT=False, HAS_STEPS=True,
                                                     steps_ptr=0, partials_ptr=None, split_clipped_ptr=None),
                           b.num_warps)
            # merge_normalize with one split of x: the merge and y in one program.
            compile_kernel(k._merge_kernel, x, dict(tiles, SPLITS=False, HAS_MASK=True, HAS_SCALE=True, HAS_STEPS=True,
                                                    UPDATE=True, WITH_OUTPUT=True, PREVIOUS=previous, NORMALIZE=True,
                                                    MERGE_R=b.merge, split_clipped_ptr=None, table_ptr=None,
                                                    y_table_ptr=None), b.num_warps)
        ptx = compile_kernel(k._normalize_kernel, x, dict(tiles, HAS_MASK=True, HAS_SCALE=False, scale_ptr=None,
                                                          mean_ptr=None, var_ptr=None, FROM_Y_TABLE=True,
                                                          WITH_DIAG=True), b.num_warps)
        # The clipped counts: a relaxed GPU-scope float64 add (triton 3.6 emits it as atom, later ones as red).
        assert any(f"{op}.global.gpu.relaxed.add.f64" in ptx for op in ("red", "atom")), x
        compile_kernel(k._normalize_kernel, x, dict(tiles, HAS_MASK=False, mask_ptr=None, HAS_SCALE=True,
                                                    FROM_Y_TABLE=False, y_table_ptr=None, WITH_DIAG=False,
                                                    diag_ptr=None), b.num_warps)
        g = a.choose_advantage_blocks(4096, 16, 16, size, programs=264)
        blocks = dict(ACC=acc, BLOCK_O=g.outer, BLOCK_G=g.groups, BLOCK_I=g.inner)
        ptx = compile_kernel(a._reduce_kernel, x, dict(blocks, HAS_MASK=True, MOMENTS=False, SPLIT=True,
                                                       MERGE_R=g.merge, table_ptr=None), g.num_warps)
        assert "atom.global.gpu.acq_rel.add" in ptx and "ld.global.cg" in ptx, x
        compile_kernel(a._normalize_kernel, x, blocks, g.num_warps)
        return b, g

    for x in DTYPES:
        b, g = every_kernel_in(x)
    # The merges of split tables read and write float64 tables only: one compile each.
    no_x = dict(x_ptr=None, out_ptr=None, mask_ptr=None, HAS_MASK=False, NORMALIZE=False, ACC=tl.float32,
                BLOCK_R=1, BLOCK_C=b.cols, MERGE_R=b.merge)
    for previous in (True, False):
        compile_kernel(k._merge_kernel, "fp64", dict(no_x, SPLITS=True, HAS_SCALE=True, HAS_STEPS=True, UPDATE=True,
                                                     WITH_OUTPUT=True, PREVIOUS=previous, table_ptr=None,
                                                     split_clipped_ptr=None if not previous else 0))
    compile_kernel(k._merge_kernel, "fp64", dict(no_x, SPLITS=True, HAS_SCALE=False, HAS_STEPS=False, UPDATE=False,
                                                 WITH_OUTPUT=False, PREVIOUS=False, split_clipped_ptr=None,
                                                 mean_ptr=None, var_ptr=None, count_ptr=None, diag_ptr=None,
                                                 scale_ptr=None, steps_ptr=None, y_table_ptr=None))
    compile_kernel(k._merge_kernel, "fp64", dict(no_x, SPLITS=False, HAS_SCALE=False, scale_ptr=None, HAS_STEPS=False,
                                                 steps_ptr=None, UPDATE=True, WITH_OUTPUT=True, PREVIOUS=True,
                                                 split_clipped_ptr=None, table_ptr=None))
    compile_kernel(a._merge_parts_kernel, "fp64", dict(BLOCK_G=g.groups))

    # The variants, with small blocks: without an output or a mask, moments only (one split or several).
    small = dict(HAS_MASK=True, HAS_SCALE=False, scale_ptr=None, HAS_STEPS=False, steps_ptr=None, ACC=tl.float32,
                 BLOCK_R=32, BLOCK_C=64, PREVIOUS=False, split_clipped_ptr=None, table_ptr=None)
    reduce = dict(small, UPDATE=True, WITH_OUTPUT=False, out_ptr=None)
    compile_kernel(k._reduce_kernel, "bf16", dict(reduce, mask_ptr=None, HAS_MASK=False, SPLIT=True))
    compile_kernel(k._reduce_kernel, "fp64", dict(reduce, ACC=tl.float64, BLOCK_C=32, SPLIT=False, partials_ptr=None,
                                                  HAS_STEPS=True, steps_ptr=0))
    moments = dict(small, UPDATE=False, WITH_OUTPUT=False, out_ptr=None, mean_ptr=None, var_ptr=None, count_ptr=None,
                   diag_ptr=None)
    compile_kernel(k._reduce_kernel, "fp16", dict(moments, SPLIT=True, table_ptr=None))
    compile_kernel(k._reduce_kernel, "fp16", dict(moments, SPLIT=False, partials_ptr=None, table_ptr=0))
    normalize = dict(HAS_MASK=False, mask_ptr=None, HAS_SCALE=False, scale_ptr=None, FROM_Y_TABLE=False,
                     y_table_ptr=None, WITH_DIAG=False, diag_ptr=None)
    compile_kernel(k._normalize_kernel, "fp64", dict(normalize, ACC=tl.float64, BLOCK_C=32, BLOCK_R=64))
    blocks = dict(ACC=tl.float32, BLOCK_O=4, BLOCK_G=8, BLOCK_I=64)
    stats = dict(blocks, HAS_MASK=True, MOMENTS=False, SPLIT=True, MERGE_R=64, table_ptr=None)
    compile_kernel(a._reduce_kernel, "fp64", dict(stats, ACC=tl.float64, mask_ptr=None, HAS_MASK=False,
                                                  SPLIT=False, partials_ptr=None, arrivals_ptr=None))
    compile_kernel(a._reduce_kernel, "fp32", dict(blocks, HAS_MASK=True, MOMENTS=True, SPLIT=True, MERGE_R=64,
                                                  stats_ptr=None))
    print("ok")
""")


@pytest.mark.skipif(TRITON_ERROR is not None, reason=str(TRITON_ERROR))
@pytest.mark.skipif(INTERPRETED, reason="compiled in the run without TRITON_INTERPRET")
@pytest.mark.parametrize("arch", [80, 90], ids=["sm80", "sm90"])
def test_every_kernel_compiles_in_every_dtype(tmp_path, arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(arch)], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
