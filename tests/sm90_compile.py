"""Compile the LayerNorm kernels for an H100 (sm_90) without a GPU; print one JSON line per variant.

Run as a script, in a process without TRITON_INTERPRET (the interpreter replaces the compiler):
Triton lowers each kernel to PTX and ptxas (shipped in Triton's wheel) assembles it, so lowering
errors that the interpreter cannot see show up on a CPU machine. Used by test_layer_norm_kernel.py.
Each kernel is specialised as Triton's launcher does for the benchmark shape (8 × 2048 rows): pointers
16-byte aligned, and the integer arguments that are multiples of 16 marked so, which is what lets it
vectorise loads and asynchronous copies.
"""

import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gnsrepro.kernels import layer_norm as K

TARGET = GPUTarget("cuda", 90, 32)
POINTERS = {  # the dtype of each pointer argument, by name; X's dtype is "{x}", DY's "{dy}"
    "X": "{x}", "RES": "{x}", "S": "{x}", "W": "fp32", "BIAS": "fp32", "Y": "{x}", "STATS": "fp32",
    "DY": "{dy}", "DX": "{x}", "DRES": "{x}", "DX2": "fp32", "PART": "fp32", "SQ": "fp32", "DW": "fp32",
    "DB": "fp32", "CNT": "i32", "SQPART": "fp32", "COUNTER": "i32",
}
FLOATS = {"eps"}


def compile_one(fn, consts: dict, x: str, dy: str, ints: dict) -> dict:
    """Compile fn; ints: the integer arguments' values at the shape (for their divisibility by 16)."""
    opts = {k: consts.pop(k) for k in ("num_warps", "maxnreg") if k in consts}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = "*" + POINTERS[name].format(x=x, dy=dy)
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
            if name not in FLOATS and ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=TARGET,
        options=dict(opts, launch_pdl=bool(consts.get("USE_PDL"))),
    )
    ptx = kernel.asm["ptx"]
    copies = [line for line in ptx.splitlines() if "cp.async.cg" in line or "cp.async.ca" in line]
    return dict(cp_async=len(copies), cp_async16=sum(", 0x10," in line for line in copies),
                griddepcontrol="griddepcontrol" in ptx, pdl_order=_pdl_order(ptx), shared=kernel.metadata.shared)


def _pdl_order(ptx: str) -> bool:
    """With PDL: the wait comes before the first global load and the trigger after a global store (the
    next kernel launches once this one's main work is done, not at its start)."""
    lines = ptx.splitlines()

    def first(*keys):
        return next((i for i, line in enumerate(lines) if any(k in line for k in keys)), None)

    wait, trigger = first("griddepcontrol.wait"), first("griddepcontrol.launch_dependents")
    load, store = first("ld.global", "cp.async"), first("st.global")
    if wait is None or trigger is None or load is None or store is None:
        return False
    return wait < load and store < trigger


def variants():
    """Every code path once: each kernel in each dtype pairing, the three work splits, the reduce kernel
    and the tail reduction over two or three levels, register prefetch of one or two tiles and the
    pipelined loads (even N)."""
    for x, dy in (("bf16", "bf16"), ("fp32", "bf16"), ("fp16", "fp16")):
        for N in (768, 999, 4096):
            yield "fwd", x, dy, N, dict(HAS_RES=True, HAS_BIAS=True, BLOCK_M=2, BLOCK_N=K._next_pow2(N),
                                        DOWNCAST=x != "fp32", USE_PDL=True, num_warps=4), dict(M=16384, N=N)
            shapes = ((8, 2048), (4096, 4), (16384, 1)) if N == 768 else ((8, 2048),)  # MODE 2, 1, 0
            for B, T in shapes:
                for tail, depth, stages, maxnreg, sub in (
                    (False, 1, 0, 0, 0), (True, 2, 0, 0, 0), (True, 1, 3, 128, -1),
                ):
                    plan = K._bwd_launch(B, T, N, True, 264, 2, 4, tail, depth, stages, maxnreg, sub)
                    consts = dict(plan.main, HAS_DRES=x == dy, HAS_DX2=x == dy, USE_PDL=tail)
                    ints = dict(M=B * T, N=N, T=T, NUM_EX=B, P=plan.P, G=plan.G, C=plan.C, R=plan.R, GP=plan.GP,
                                NGRP=plan.NGRP, SG=plan.SG, NSG=plan.NSG)
                    yield "bwd", x, dy, N, consts, ints
                    if plan.reduce is not None and x == "bf16":
                        NG, NC, NB = plan.reduce[:3]
                        yield "reduce", x, dy, N, dict(plan.reduce[4], USE_PDL=True), dict(NG=NG, NC=NC, N=N, NB=NB)


if __name__ == "__main__":
    kernels = dict(fwd=K._layer_norm_fwd_kernel, bwd=K._layer_norm_bwd_kernel, reduce=K._layer_norm_bwd_reduce_kernel)
    for kind, x, dy, N, consts, ints in variants():
        row = dict(kind=kind, x=x, dy=dy, N=N, **{k: v for k, v in consts.items() if k.isupper() or k == "maxnreg"})
        try:
            row.update(compile_one(kernels[kind], dict(consts), x, dy, ints), ok=True)
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[-2000:]}")
        print(json.dumps(row), flush=True)
    sys.exit(0)
