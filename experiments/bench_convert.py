"""Throughput and peak memory of the streaming HLWQ converter (``hlwq-quantize``), on CPU or GPU.

Builds a synthetic bf16 checkpoint of about ``--gb`` GB — by default cycling through five Nemotron-H 30B-A3B shapes
(Mamba in_proj [10304, 2688], expert up/down [1856, 2688] / [2688, 1856], attention q/o [4096, 2688] / [2688, 4096]);
with ``--nemotron-shapes`` every quantized tensor kind of Nemotron-H with its real name and shape, layers in the
M E M E M E M * pattern and 8 routed experts per MoE layer instead of 128 (fewer tensors, same shapes) — then
1. converts it file → file to HLWQ Q5 (recipe "all", B = 128) in a child process and reports GB/s of bf16 input
   (``convert_seconds`` excludes the JAX backend start-up, reported as ``backend_init_seconds``), the number of XLA
   compilations and their time, the bytes sent host → device, the time of each pipeline phase (read and put run in a
   reader thread; dispatch, wait, write in the main thread; close = fsync + rename; finish = manifest with sha256),
   and the child's peak RSS next to the largest tensor (bounded memory: peak − baseline is set by the chunk size —
   three chunks in the read / quantize / write pipeline and the quantizer's float32 temporaries, ≈ 8 × --chunk-mb —
   not by the model; tests/ckpt/test_memory.py holds it under 2 × the largest tensor at 8 MiB chunks);
2. times the quantizer alone on device-resident tensors (no I/O): GB/s of bf16 input.
Every run appends one JSON line (command, date, machine, jax version, devices, metrics) to ``--out``.

    CPU (here):   PYTHONPATH=. .venv/bin/python experiments/bench_convert.py --gb 1 --out results/bench_convert_cpu.jsonl
    GPU (H200):   PYTHONPATH=. python3 experiments/bench_convert.py --gb 2 --chunk-mb 512 \
                      --out $OUT/bench_convert_h200.jsonl           (add --nemotron-shapes for the real shape mix)
    smoke:        ... --smoke   (a few MB, seconds)
Targets (issue 7): ≥ 0.1 GB/s on 2 CPU cores, ≥ 1 GB/s on the H200.
Measured: results/bench_convert_cpu.jsonl (2-core VM, shared) and results/bench_convert_h200.jsonl.
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import pathlib
import platform
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAPES = [((10304, 2688), "mixer.in_proj.weight"), ((1856, 2688), "experts.0.up_proj.weight"),
          ((2688, 1856), "experts.0.down_proj.weight"), ((4096, 2688), "q_proj.weight"),
          ((2688, 4096), "o_proj.weight")]


def make_synthetic(root: pathlib.Path, gb: float, seed: int = 0, scale: float = 1.0) -> dict:
    """bf16 checkpoint of ≈ gb GB cycling through SHAPES (``scale`` shrinks every dimension, for smoke runs)."""
    import ml_dtypes
    from safetensors.numpy import save_file
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    total, i, shard, shard_bytes, n_shard, largest, base = 0, 0, {}, 0, 0, 0, {}
    target = gb * 1e9
    while total < target:
        (o, n), suffix = SHAPES[i % len(SHAPES)]
        shape = (max(8, int(o * scale)), max(128, int(n * scale) // 128 * 128))
        if shape not in base:  # one Gaussian draw per shape; later tensors are cheap rescalings of it
            base[shape] = rng.standard_normal(shape, dtype=np.float32) * 0.02
        x = (base[shape] * np.float32(1.0 + 0.01 * (i % 7))).astype(ml_dtypes.bfloat16)
        shard[f"backbone.layers.{i}.{suffix}"] = x
        total += x.nbytes
        shard_bytes += x.nbytes
        largest = max(largest, x.nbytes)
        i += 1
        if shard_bytes > 2e9 or total >= target:
            n_shard += 1
            save_file(shard, str(root / f"model-{n_shard:05d}.safetensors"), metadata={"format": "pt"})
            shard, shard_bytes = {}, 0
    (root / "config.json").write_text(json.dumps({"model_type": "synthetic"}))
    return {"input_bytes": total, "tensors": i, "largest_tensor_bytes": largest}


# Nemotron-H 30B-A3B (docs/models.md): hidden 2688, Mamba d_inner 4096, 128 experts of 1856, a shared expert of 3712,
# 32 q / 2 kv heads of 128. Layer kinds in the order of its hybrid pattern's most common run (M E M E … M *).
NEMOTRON_LAYERS = {
    "M": [("mixer.in_proj.weight", (10304, 2688)), ("mixer.out_proj.weight", (2688, 4096))],
    "E": [("mixer.gate.weight", (128, 2688)), ("mixer.shared_experts.up_proj.weight", (3712, 2688)),
          ("mixer.shared_experts.down_proj.weight", (2688, 3712))],
    "*": [("mixer.q_proj.weight", (4096, 2688)), ("mixer.k_proj.weight", (256, 2688)),
          ("mixer.v_proj.weight", (256, 2688)), ("mixer.o_proj.weight", (2688, 4096))],
}
NEMOTRON_EXPERT = [("up_proj.weight", (1856, 2688)), ("down_proj.weight", (2688, 1856))]
NEMOTRON_PATTERN = "MEMEMEM*"


def nemotron_tensors(gb: float, experts: int = 8):
    """[(name, shape)] of ≈ gb GB of bf16 with Nemotron-H's real tensor shapes; the count is scaled down (layers
    cycle through NEMOTRON_PATTERN, ``experts`` routed experts per MoE layer instead of 128), shapes are not."""
    out, total, i = [], 0, 0
    while total < gb * 1e9:
        kind = NEMOTRON_PATTERN[i % len(NEMOTRON_PATTERN)]
        layer = [(f"backbone.layers.{i}.{n}", s) for n, s in NEMOTRON_LAYERS[kind]]
        if kind == "E":
            layer += [(f"backbone.layers.{i}.mixer.experts.{e}.{n}", s)
                      for e in range(experts) for n, s in NEMOTRON_EXPERT]
        for name, shape in layer:
            if total >= gb * 1e9:
                break
            out.append((name, shape))
            total += 2 * shape[0] * shape[1]
        i += 1
    return out


def make_nemotron_synthetic(root: pathlib.Path, gb: float, seed: int = 0) -> dict:
    """bf16 checkpoint of ≈ gb GB with Nemotron-H tensor names and shapes (``nemotron_tensors``), 2 GB shards."""
    import ml_dtypes
    from safetensors.numpy import save_file
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base, shard, shard_bytes, n_shard, total, largest = {}, {}, 0, 0, 0, 0
    specs = nemotron_tensors(gb)
    for j, (name, shape) in enumerate(specs):
        if shape not in base:  # one Gaussian draw per shape; later tensors are cheap rescalings of it
            base[shape] = rng.standard_normal(shape, dtype=np.float32) * 0.02
        shard[name] = (base[shape] * np.float32(1.0 + 0.01 * (j % 7))).astype(ml_dtypes.bfloat16)
        shard_bytes += shard[name].nbytes
        total += shard[name].nbytes
        largest = max(largest, shard[name].nbytes)
        if shard_bytes > 2e9 or j == len(specs) - 1:
            n_shard += 1
            save_file(shard, str(root / f"model-{n_shard:05d}.safetensors"), metadata={"format": "pt"})
            shard, shard_bytes = {}, 0
    (root / "config.json").write_text(json.dumps({"model_type": "synthetic-nemotron-h"}))
    return {"input_bytes": total, "tensors": len(specs), "largest_tensor_bytes": largest,
            "distinct_shapes": len(base)}


def child(src: str, dst: str, chunk_mb: float, profile: str | None = None) -> None:
    """Run one conversion through the CLI in this process and print {rc, seconds, backend_init_seconds,
    peak_rss_bytes, cpu_seconds, stats} (JSON) on the last line. ``stats`` is what ``convert_checkpoint`` returned
    (compiles, compile_seconds, h2d_bytes, per-phase seconds); ``seconds`` excludes the JAX backend start-up, which is
    timed separately (on a GPU it is seconds, paid once per process). ``profile``: write the main thread's cProfile
    (functions by own time, then by cumulative time) to this text file; the timings then include cProfile's overhead."""
    import jax
    import hlwq_jax.cli.quantize as cli
    t0 = time.perf_counter()
    jax.block_until_ready(jax.device_put(np.zeros(8, np.float32)))
    init_s = time.perf_counter() - t0
    stats, convert = {}, cli.convert_checkpoint

    def keep_stats(*args, **kw):  # the CLI prints a summary only; keep the full stats for the record
        stats.update(convert(*args, **kw))
        return stats

    cli.convert_checkpoint = keep_stats
    argv = [src, dst, "--bits", "5", "--recipe", "all", "--chunk-mb", str(chunk_mb), "--no-progress"]
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    rc = prof.runcall(cli.main, argv) if prof else cli.main(argv)
    dt = time.perf_counter() - t0
    if prof:
        text = io.StringIO()
        for key in ("tottime", "cumulative"):
            pstats.Stats(prof, stream=text).sort_stats(key).print_stats(40)
        tmp = profile + ".tmp"
        pathlib.Path(tmp).write_text(text.getvalue())
        os.replace(tmp, profile)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"rc": rc, "seconds": dt, "backend_init_seconds": init_s, "peak_rss_bytes": peak_rss_bytes(),
                      "cpu_seconds": ru.ru_utime + ru.ru_stime, "stats": stats}))


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Unlike ru_maxrss it is reset by exec, so a child started from a
    big parent does not inherit the parent's peak."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def run_child(src, dst, chunk_mb, profile: str | None = None) -> dict:
    extra = ["--profile", profile] if profile else []
    out = subprocess.run([sys.executable, __file__, "--child", str(src), str(dst), "--chunk-mb", str(chunk_mb), *extra],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise RuntimeError(out.stderr[-2000:])
    return res


def quantize_only(src: pathlib.Path, chunk_mb: float) -> dict:
    """Quantizer throughput on device-resident chunks (excludes disk and host transfers)."""
    import jax
    import jax.numpy as jnp
    from hlwq_jax.ckpt.streaming import CheckpointIndex, read_rows, rows_per_chunk
    from hlwq_jax.quant.hlwq import quantize
    index = CheckpointIndex(src)
    chunks = []
    for info in list(index.tensors.values())[: len(SHAPES)]:
        rows = rows_per_chunk(info.shape, 4, int(chunk_mb * (1 << 20)))
        chunks.append(jax.device_put(jnp.asarray(read_rows(info, 0, min(rows, info.shape[0])))))
    nbytes = sum(c.nbytes for c in chunks)
    for c in chunks:  # compile
        jax.block_until_ready(quantize(c, bits=5).packed)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 5.0:
        outs = [quantize(c, bits=5).packed for c in chunks]
        jax.block_until_ready(outs)
        reps += 1
    dt = (time.perf_counter() - t0) / reps
    return {"quantize_only_gb_per_s": nbytes / dt / 1e9, "quantize_only_bytes_per_rep": nbytes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--chunk-mb", type=float, default=16.0)
    p.add_argument("--out", default="results/bench_convert_cpu.jsonl")
    p.add_argument("--workdir", default=None, help="where the synthetic checkpoints go (default: a temp dir)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--nemotron-shapes", action="store_true",
                   help="synthesise Nemotron-H's real tensor shapes and names (counts scaled down to --gb)")
    p.add_argument("--profile", default=None, metavar="TXT",
                   help="also convert once more under cProfile and write the main thread's profile to TXT")
    p.add_argument("--child", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(*a.child, a.chunk_mb, a.profile)
    import jax

    from hlwq_jax.provenance import code_version
    scale = 0.1 if a.smoke else 1.0
    gb = 0.005 if a.smoke else a.gb
    work = pathlib.Path(tempfile.mkdtemp(dir=a.workdir, prefix="bench_convert_"))
    try:
        t0 = time.perf_counter()
        info = (make_nemotron_synthetic(work / "src", gb) if a.nemotron_shapes and not a.smoke
                else make_synthetic(work / "src", gb, scale=scale))
        make_synthetic(work / "tiny", 0.0001, scale=0.05)  # baseline process: same code path, tiny tensors
        gen_s = time.perf_counter() - t0
        base = run_child(work / "tiny", work / "tiny_q", a.chunk_mb)
        big = run_child(work / "src", work / "q", a.chunk_mb)
        out_bytes = sum(f.stat().st_size for f in (work / "q").glob("*.safetensors"))
        q = quantize_only(work / "src", a.chunk_mb)
        if a.profile:  # a separate run: cProfile slows the main thread, so the timed run above stays unprofiled
            run_child(work / "src", work / "q_profiled", a.chunk_mb, os.path.abspath(a.profile))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rec = {
        "bench": "convert", "command": " ".join([sys.executable] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"node": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "jax_version": jax.__version__, "devices": [str(d) for d in jax.devices()], "backend": jax.default_backend(),
        **code_version(), "config": {"gb": gb, "chunk_mb": a.chunk_mb, "bits": 5, "block_size": 128,
                                     "recipe": "all", "smoke": a.smoke, "nemotron_shapes": a.nemotron_shapes},
        "synthetic": info, "synthetic_write_s": gen_s,
        "convert_seconds": big["seconds"], "convert_gb_per_s": info["input_bytes"] / big["seconds"] / 1e9,
        "backend_init_seconds": big["backend_init_seconds"],
        "convert_gb_per_s_with_init": info["input_bytes"] / (big["seconds"] + big["backend_init_seconds"]) / 1e9,
        "compiles": big["stats"].get("compiles"), "compile_seconds": big["stats"].get("compile_seconds"),
        "h2d_bytes": big["stats"].get("h2d_bytes"), "chunks": big["stats"].get("chunks"),
        "phase_seconds": {k[: -len("_seconds")]: v for k, v in big["stats"].items()
                          if k.endswith("_seconds") and k != "compile_seconds"},
        "convert_cpu_seconds": big["cpu_seconds"] - base["cpu_seconds"],  # process CPU time net of the tiny run
        "load_average_1min": os.getloadavg()[0],
        "output_bytes": out_bytes, "compression": info["input_bytes"] / out_bytes,
        "peak_rss_bytes": big["peak_rss_bytes"], "baseline_peak_rss_bytes": base["peak_rss_bytes"],
        "peak_over_baseline_per_largest_tensor": (big["peak_rss_bytes"] - base["peak_rss_bytes"])
        / info["largest_tensor_bytes"],
        "input_over_largest_tensor": info["input_bytes"] / info["largest_tensor_bytes"],
        **q,
    }
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:  # one JSON line per run
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec, indent=2))


if __name__ == "__main__":
    main()
