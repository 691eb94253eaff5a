"""Compile a Pallas-Triton kernel of this project to SASS on a machine WITHOUT a GPU and count its instructions.

How the seventh session designed the decode GEMV (results/gemv_explore/): lower the kernel for CUDA on the CPU
(Pallas emits Triton IR; the GPU query is answered as an H100/H200, sm_90), compile that IR with a local Triton of the
device's version (3.6.0), then ptxas -v (registers, spills) and cuobjdump -sass. Layout conversions, barriers,
shared-memory traffic and instructions per code show up here before any device time is spent.

Needs Triton next to the project, not in its dependencies:
    python3.12 -m pip install --target /tmp/tri triton==3.6.0
    .venv/bin/python scripts/kernel_sass.py --triton /tmp/tri --bits 5 --shape 131072 2688 [--stacked 128] [--m 16]
Prints: kernels found, registers, instruction histogram (whole kernel and each loop body), convert_layout ops in the
TTGIR. ``--m`` picks the path (M = 1 the GEMV; larger M the dot or dequant kernel, or the grouped one with
``--stacked``); ``--gemv rows=4,max_tiles=1`` picks a GemvConfig, ``--pallas k=v,...`` the other config fields;
``--dump DIR`` keeps the ttgir / ptx / sass (where a load
sits in the schedule shows there).
"""
from __future__ import annotations

import argparse
import collections
import pathlib
import re
import subprocess
import sys
import tempfile

_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)")


def sass_histogram(sass_text: str) -> collections.Counter:
    """Opcode (without modifiers) → count, over every instruction line of ``cuobjdump -sass`` output."""
    return collections.Counter(m.group(2) for line in sass_text.splitlines() if (m := _SASS_LINE.match(line)))


_BACK_BRANCH = re.compile(r"^\s+/\*([0-9a-f]{4})\*/\s+@!?U?P\w+\s+BRA\s+(?:`\(\.L_x_\d+\)\s+)?0x([0-9a-f]+)")


def loop_histograms(sass_text: str) -> list[tuple[int, int, collections.Counter]]:
    """(start, end, opcode histogram) of each loop: the instructions from a conditional backward branch's target to
    the branch (where a step loop's instructions per code are read)."""
    lines = sass_text.splitlines()
    ops = [(int(m.group(1), 16), m.group(2)) for line in lines if (m := _SASS_LINE.match(line))]
    loops = []
    for line in lines:
        if (m := _BACK_BRANCH.match(line)) and int(m.group(2), 16) < int(m.group(1), 16):
            start, end = int(m.group(2), 16), int(m.group(1), 16)
            loops.append((start, end, collections.Counter(op for a, op in ops if start <= a <= end)))
    return loops


def lower_ttir(bits: int, out: int, n_in: int, stacked: int, gemv: dict | None = None, m: int = 1,
               pallas: dict | None = None) -> list[tuple[str, int, int]]:
    """(Triton IR as generic MLIR text, num_warps, num_stages) of each Pallas kernel of ``hlwq_matmul`` for M = ``m``
    tokens on an [out, n_in] Q``bits`` weight (``ragged_hlwq_matmul`` on [stacked, out, n_in], m token rows, when
    ``stacked``), with ``GemvConfig(**gemv)`` and the other Pallas config fields ``pallas``; lowered for CUDA here."""
    import jax
    import jax.numpy as jnp
    from jax._src.pallas.triton import gpu_info, pallas_call_registration as reg

    reg.gpu_info_lib.get_gpu_info = lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    texts, lower, custom_call = [], reg.lowering.lower_jaxpr_to_triton_module, reg.mlir.custom_call

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        texts.append(result.module.operation.get_asm(print_generic_op_form=True))
        return result

    def capture_params(*args, backend_config=None, **kwargs):  # the warps and stages the kernel is launched with
        if isinstance(backend_config, dict) and "num_warps" in backend_config:
            texts[-1] = (texts[-1], backend_config["num_warps"].value, backend_config["num_stages"].value)
        return custom_call(*args, backend_config=backend_config, **kwargs)

    reg.lowering.lower_jaxpr_to_triton_module = capture
    reg.mlir.custom_call = capture_params
    import hlwq_jax.ops.hlwq_matmul.pallas_triton as pt
    import hlwq_jax.ops.ragged_hlwq_matmul.pallas_triton as rpt
    from hlwq_jax.ops.hlwq_matmul import hlwq_matmul
    from hlwq_jax.ops.hlwq_matmul.layout import PLANE_WIDTHS, ROW_ALIGN, HLWQPlanes
    from hlwq_jax.ops.ragged_hlwq_matmul import ragged_hlwq_matmul

    pt.check_can_run = rpt.check_can_run = lambda interpret: None  # lowering only: nothing runs here
    s = jax.ShapeDtypeStruct
    rows, nc = -(-out // ROW_ALIGN) * ROW_ALIGN, -(-n_in // 128)
    lead = (stacked,) if stacked else ()
    planes = tuple(s((*lead, rows, nc * 4 * w), jnp.uint32) for w in PLANE_WIDTHS[bits])
    p = HLWQPlanes(planes=planes, norms_t=s((*lead, nc, rows), jnp.float16), table=s((2 ** bits,), jnp.float32),
                   codebook=s((2 ** bits,), jnp.float32), bits=bits, block_size=128, shape=(*lead, out, n_in))
    from hlwq_jax.ops.hlwq_matmul import PallasConfig
    from hlwq_jax.ops.hlwq_matmul.gemv_triton import GemvConfig
    from hlwq_jax.ops.ragged_hlwq_matmul.pallas_triton import RaggedPallasConfig
    cfg = GemvConfig(**(gemv or {}))
    try:
        if stacked:
            rcfg = RaggedPallasConfig(gemv=cfg, **(pallas or {}))
            fn = jax.jit(lambda x, w, g: ragged_hlwq_matmul(x, w, g, impl="pallas", config=rcfg))
            fn.trace(s((m, n_in), jnp.bfloat16), p, s((stacked,), jnp.int32)).lower(lowering_platforms=("cuda",))
        else:
            fn = jax.jit(lambda x, w: hlwq_matmul(x, w, impl="pallas", config=PallasConfig(gemv=cfg, **(pallas or {}))))
            fn.trace(s((m, n_in), jnp.bfloat16), p).lower(lowering_platforms=("cuda",))
    finally:
        reg.mlir.custom_call = custom_call
    return texts


# Run in a subprocess with the Triton of ``--triton`` first on sys.path: argv = triton_dir, ttir, out_dir, warps,
# stages. ``triton.compile`` starts an IR file at the stage after it, so the TTIR passes XLA runs on a Pallas module
# (xla/backends/gpu/codegen/triton/compilation_pipeline_cuda.cc, MakeTTIR; e.g. the combine pass that folds
# acc + dot(a, b) into dot(a, b, acc)) are run here first.
_COMPILE = """
import sys
sys.path.insert(0, sys.argv[1])
import triton
from triton._C.libtriton import ir, passes
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend

target = GPUTarget("cuda", 90, 32)
ctx = ir.context()
ir.load_dialects(ctx)
make_backend(target).load_dialects(ctx)
mod = ir.parse_mlir_module(sys.argv[2], ctx)
pm = ir.pass_manager(ctx)
c, t = passes.common, passes.ttir
for add in (c.add_inliner, t.add_rewrite_tensor_pointer, c.add_canonicalizer, t.add_combine, t.add_reorder_broadcast,
            c.add_cse, c.add_symbol_dce, t.add_loop_unroll):
    add(pm)
pm.run(mod, "make_ttir")
open(sys.argv[2], "w").write(str(mod))
k = triton.compile(sys.argv[2], target=target, options=dict(num_warps=int(sys.argv[4]), num_stages=int(sys.argv[5])))
d = sys.argv[3]
open(d + "/kernel.ttgir", "w").write(k.asm["ttgir"])
open(d + "/kernel.ptx", "w").write(k.asm["ptx"])
open(d + "/kernel.cubin", "wb").write(k.asm["cubin"])
"""


def compile_sass(ttir: str, triton_dir: str, work: pathlib.Path, num_warps: int = 1, num_stages: int = 1) -> dict:
    """Compile one TTIR module with the Triton found in ``triton_dir`` for sm_90a; returns its texts and counts."""
    src = work / "kernel.ttir"
    src.write_text(ttir)
    subprocess.run([sys.executable, "-c", _COMPILE, triton_dir, str(src), str(work), str(num_warps), str(num_stages)],
                   check=True)
    bin_dir = pathlib.Path(triton_dir) / "triton" / "backends" / "nvidia" / "bin"
    ptxas = subprocess.run([str(bin_dir / "ptxas"), "-arch=sm_90a", "-v", str(work / "kernel.ptx"), "-o",
                            str(work / "kernel.o")], capture_output=True, text=True, check=True).stderr
    sass = subprocess.run([str(bin_dir / "cuobjdump"), "-sass", str(work / "kernel.cubin")], capture_output=True,
                          text=True, check=True).stdout
    (work / "kernel.sass").write_text(sass)
    return dict(ptxas=" ".join(l.strip() for l in ptxas.splitlines() if "registers" in l),
                histogram=sass_histogram(sass), loops=loop_histograms(sass),
                converts=(work / "kernel.ttgir").read_text().count("convert_layout"))


def _fields(text: str) -> dict:
    """"a=1,lookup=gather" → {"a": 1, "lookup": "gather"} (ints where they parse)."""
    pairs = (kv.split("=") for kv in text.split(",") if kv)
    return {k: int(v) if v.lstrip("-").isdigit() else v for k, v in pairs}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--triton", required=True, help="directory holding a `triton` package (3.6.0 for the H200)")
    ap.add_argument("--bits", type=int, default=5)
    ap.add_argument("--shape", type=int, nargs=2, default=(131072, 2688), metavar=("OUT", "IN"))
    ap.add_argument("--stacked", type=int, default=0, help="experts E: the ragged kernels instead")
    ap.add_argument("--m", type=int, default=1, help="tokens (token rows of the ragged kernels): picks the path")
    ap.add_argument("--gemv", default="", help="GemvConfig fields, e.g. rows=4,max_tiles=1")
    ap.add_argument("--pallas", default="", help="PallasConfig (RaggedPallasConfig with --stacked) fields, "
                                                   "e.g. block_n_deq=32,lookup=gather")
    ap.add_argument("--stages", type=int, default=0, help="Triton num_stages to compile with (0: the kernel's own)")
    ap.add_argument("--dump", default="", help="keep each kernel's ttgir / ptx / sass under DUMP/<i>/")
    args = ap.parse_args(argv)
    texts = lower_ttir(args.bits, *args.shape, args.stacked, _fields(args.gemv), args.m, _fields(args.pallas))
    print(f"kernels: {len(texts)}")
    for i, (ttir, warps, stages) in enumerate(texts):
        with tempfile.TemporaryDirectory() as d:
            work = pathlib.Path(args.dump) / str(i) if args.dump else pathlib.Path(d)
            work.mkdir(parents=True, exist_ok=True)
            r = compile_sass(ttir, args.triton, work, num_warps=warps, num_stages=args.stages or stages)
        print(f"[{i}] {warps} warps; {r['ptxas']}; {sum(r['histogram'].values())} instructions; "
              f"convert_layout ops: {r['converts']}")
        print("    " + " ".join(f"{op}:{n}" for op, n in r["histogram"].most_common(16)))
        for start, end, hist in r["loops"]:
            print(f"    loop {start:#x}–{end:#x}: {sum(hist.values())} instructions; "
                  + " ".join(f"{op}:{n}" for op, n in hist.most_common(12)))


if __name__ == "__main__":
    main()
