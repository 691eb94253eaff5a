"""Profile this project's Pallas kernels with Nsight Compute on the device machine: where warps wait, per SASS line.

How the tenth session found what bounds the kernels (results/ncu_h200/): ncu samples every warp's stall reason at
each SASS instruction; summed, that says whether a kernel waits on global loads (long_sb), on the shared-memory /
shuffle queue (mio, short_sb), on barriers or on the tensor cores, and the top lines say which instruction. It found
the per-program table set-up of ``lane_lut.lane_table`` issuing 31 predicated loads into one register, one after
another (fixed there), and the per-chunk norm load each wgmma waits for.

On the device (ncu reads hardware counters on the Firecracker machines; its runtime is in ../.library/device):
    PYTHONPATH=. python3 scripts/ncu_profile.py profile dense:lm_head:16 grouped dense:in_proj:1 --out $OUT/ncu
writes per case NAME.txt (ncu --page details), NAME_sass.csv (per-instruction samples) and NAME_stalls.md, and prints
the stall tables. A case runs its jitted call three times; ncu profiles the third launch of a kernel named hlwq*.
    python3 scripts/ncu_profile.py stalls NAME_sass.csv [--top 30]      # the table again, anywhere
    PYTHONPATH=. python3 scripts/ncu_profile.py kernels decode dense:in_proj:1 --out $OUT/kernels
lists every kernel of one call (XLA's fusions too) with its duration (``gpu__time_duration``, one ncu pass, no
filter): the third call, after a marker kernel launched before it. That is how the grouped decode's binary search
showed up as 18 kernels of 2 µs (results/ncu_h200/decode_kernel_list.md).
Cases: ``dense:SHAPE:M[:BITS]`` (hlwq_matmul on a Nemotron shape of experiments/bench_hlwq_matmul.py),
``grouped[:BITS]`` (the MoE prefill, 4096 tokens × top-6 over 128 experts of expert_up), ``decode[:BITS]`` (6 token
rows on 6 experts). Bits default to 5; weights are random codes (bench_hlwq_matmul.random_hlwq).
"""
from __future__ import annotations

import argparse
import collections
import csv
import io
import os
import pathlib
import subprocess
import sys

SAMPLES = "# Samples"


def parse_case(spec: str) -> tuple[str, dict]:
    """'dense:lm_head:16[:4]' | 'grouped[:4]' | 'decode[:4]' → (kind, fields); raises naming the bad part."""
    kind, *rest = spec.split(":")
    if kind == "dense":
        if len(rest) not in (2, 3):
            raise ValueError(f"case {spec!r}: want dense:SHAPE:M[:BITS]")
        fields = dict(shape=rest[0], m=int(rest[1]), bits=int(rest[2]) if len(rest) == 3 else 5)
    elif kind in ("grouped", "decode"):
        if len(rest) > 1:
            raise ValueError(f"case {spec!r}: want {kind}[:BITS]")
        fields = dict(bits=int(rest[0]) if rest else 5)
    else:
        raise ValueError(f"case {spec!r}: the kind must be dense, grouped or decode, got {kind!r}")
    if not 2 <= fields["bits"] <= 8:
        raise ValueError(f"case {spec!r}: bits must be in 2..8")
    return kind, fields


MARKER = "ncu_call_marker"


def marker_kernel(interpret: bool = False):
    """Run a 16-element copy kernel named MARKER (Pallas-Triton, like the project's kernels): the mark ``kernels``
    lists the kernels after."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    def copy(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1.0

    call = pl.pallas_call(copy, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32), name=MARKER, interpret=interpret,
                          compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1))
    return jax.jit(call)(jnp.zeros((16,), jnp.float32))


def run_case(spec: str, marker: bool = False) -> None:
    """Build the case's inputs and run its jitted call three times (what ncu profiles); with ``marker``, the MARKER
    kernel runs (and finishes) before the third call."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from experiments.bench_hlwq_matmul import SHAPES, random_hlwq
    from hlwq_jax.ops.hlwq_matmul import hlwq_matmul
    from hlwq_jax.ops.hlwq_matmul.layout import repack
    from hlwq_jax.ops.ragged_hlwq_matmul import ragged_hlwq_matmul

    kind, f = parse_case(spec)
    key = jax.random.PRNGKey(0)
    if kind == "dense":
        if f["shape"] not in SHAPES:
            raise ValueError(f"case {spec!r}: unknown shape {f['shape']!r}; one of {sorted(SHAPES)}")
        n_in, out = SHAPES[f["shape"]]
        w = jax.jit(repack)(random_hlwq(key, (out, n_in), f["bits"]))
        x = jax.random.normal(key, (f["m"], n_in), jnp.bfloat16)
        fn = jax.jit(lambda x_, w_: hlwq_matmul(x_, w_, impl="pallas"))
    else:
        n_in, out = SHAPES["expert_up"]
        t, n_e = (4096 * 6, 128) if kind == "grouped" else (6, 128)
        counts = (np.bincount(np.random.default_rng(0).integers(0, n_e, size=t), minlength=n_e) if kind == "grouped"
                  else np.repeat([1, 0], [t, n_e - t]))
        gs = jnp.asarray(counts, jnp.int32)
        w = jax.jit(repack)(random_hlwq(key, (n_e, out, n_in), f["bits"]))
        x = jax.random.normal(key, (t, n_in), jnp.bfloat16)
        fn = jax.jit(lambda x_, w_: ragged_hlwq_matmul(x_, w_, gs, impl="pallas"))
    for i in range(3):
        if marker and i == 2:
            jax.block_until_ready(marker_kernel())
        jax.block_until_ready(fn(x, w))


def stall_table(csv_text: str) -> tuple[collections.Counter, list[dict]]:
    """(stall reason → samples summed over instructions, per-instruction rows sorted by samples) from the CSV of
    ``ncu --page source --csv --print-source sass`` (a kernel-name line, then the header, then one row per
    instruction). Each row: address, source, samples, executed, and its own reasons."""
    lines = csv_text.splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"Address"')), None)
    if start is None:
        raise ValueError("no '\"Address\",...' header line: not an ncu source-page CSV")
    reader = csv.DictReader(io.StringIO("\n".join(lines[start:])))
    reasons = [h for h in reader.fieldnames if h.startswith("stall_") and not h.endswith("(Not Issued)")]
    if not reasons or SAMPLES not in reader.fieldnames:
        raise ValueError(f"the CSV has no stall_* / {SAMPLES!r} columns (profile with the SourceCounters section)")
    totals, rows = collections.Counter(), []
    for r in reader:
        own = collections.Counter({h[len("stall_"):]: int(r[h] or 0) for h in reasons})
        totals.update(own)
        rows.append(dict(address=r["Address"], source=r["Source"].strip(), samples=int(r[SAMPLES] or 0),
                         executed=int(r.get("Instructions Executed") or 0), reasons=own))
    rows.sort(key=lambda r: -r["samples"])
    return totals, rows


_UNITS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}


def kernel_list(csv_text: str, marker: str = MARKER) -> list[tuple[str, float]]:
    """(kernel name, µs) of every kernel after the last ``marker`` launch, from ``ncu --csv --metrics
    gpu__time_duration.sum`` output (``==PROF==`` lines, then a header line starting with "ID", one row per
    kernel)."""
    lines = csv_text.splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None:
        raise ValueError("no '\"ID\",...' header line: not ncu --csv metrics output")
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))
    for need in ("Kernel Name", "Metric Name", "Metric Unit", "Metric Value"):
        if rows and need not in rows[0]:
            raise ValueError(f"ncu CSV has no {need!r} column")
    ks = []
    for r in rows:
        if r["Metric Name"] != "gpu__time_duration.sum":
            continue
        if r["Metric Unit"] not in _UNITS:
            raise ValueError(f"kernel {r['Kernel Name']!r}: unknown duration unit {r['Metric Unit']!r}")
        ks.append((r["Kernel Name"], float(r["Metric Value"].replace(",", "")) * _UNITS[r["Metric Unit"]]))
    last = max((i for i, (name, _) in enumerate(ks) if name == marker), default=None)
    if last is None:
        raise ValueError(f"no {marker!r} kernel in the CSV (run the case with --marker)")
    return ks[last + 1:]


def render_kernels(ks: list[tuple[str, float]]) -> str:
    out = [f"{len(ks)} kernels, {sum(t for _, t in ks):.1f} µs of kernel time", "", "| kernel | µs |", "|---|---|"]
    return "\n".join(out + [f"| {name[:80]} | {t:.2f} |" for name, t in ks]) + "\n"


def kernels(specs: list[str], out: pathlib.Path) -> None:
    for spec, name, run in _ncu_runs(specs, out, ["--metrics", "gpu__time_duration.sum", "--csv"], ["--marker"]):
        (out / f"{name}_kernels.csv").write_text(run.stdout)
        table = f"# {spec}: one call\n\n" + render_kernels(kernel_list(run.stdout))
        (out / f"{name}_kernels.md").write_text(table)
        print(table, flush=True)


def render_stalls(totals: collections.Counter, rows: list[dict], top: int = 25) -> str:
    total = sum(totals.values()) or 1
    out = [f"samples: {total}", "", "| stall reason | samples | share |", "|---|---|---|"]
    out += [f"| {k} | {v} | {100 * v / total:.1f} % |" for k, v in totals.most_common() if v]
    out += ["", "| address | samples | executed | instruction | top reasons |", "|---|---|---|---|---|"]
    for r in rows[:top]:
        why = ", ".join(f"{k} {v}" for k, v in r["reasons"].most_common(3) if v)
        out.append(f"| {r['address'][-5:]} | {r['samples']} | {r['executed']} | `{r['source'][:70]}` | {why} |")
    return "\n".join(out) + "\n"


def _ncu_runs(specs: list[str], out: pathlib.Path, ncu_args: list[str], case_args: list[str] = ()):
    """Yield (spec, file stem, finished process) of ``ncu NCU_ARGS python3 THIS case SPEC CASE_ARGS`` per case;
    a failed run is printed and skipped. ``{stem}`` in ncu_args becomes out/stem."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # ncu saves and restores device memory per pass
    for spec in specs:
        parse_case(spec)
        name = spec.replace(":", "_")
        cmd = ["ncu", "--clock-control", "none", *(a.replace("{stem}", str(out / name)) for a in ncu_args),
               sys.executable, __file__, "case", spec, *case_args]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if run.returncode:
            print(f"{spec}: ncu exited {run.returncode}\n{run.stdout[-800:]}{run.stderr[-800:]}", flush=True)
            continue
        yield spec, name, run


def profile(specs: list[str], out: pathlib.Path, top: int) -> None:
    args = ["--set", "full", "--import-source", "no", "-k", "regex:hlwq", "--launch-skip", "2", "--launch-count", "1",
            "-f", "-o", "{stem}"]
    for spec, name, _ in _ncu_runs(specs, out, args):
        rep = f"{out / name}.ncu-rep"
        details = subprocess.run(["ncu", "-i", rep, "--page", "details"], capture_output=True, text=True)
        (out / f"{name}.txt").write_text(details.stdout)
        src = subprocess.run(["ncu", "-i", rep, "--page", "source", "--csv", "--print-source", "sass"],
                             capture_output=True, text=True, check=True).stdout
        (out / f"{name}_sass.csv").write_text(src)
        table = f"# {spec}\n\n" + render_stalls(*stall_table(src), top=top)
        (out / f"{name}_stalls.md").write_text(table)
        print(table, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("profile", help="run ncu on each case (device machine)")
    p.add_argument("cases", nargs="+")
    p.add_argument("--out", required=True, type=pathlib.Path)
    p.add_argument("--top", type=int, default=25)
    k = sub.add_parser("kernels", help="list every kernel of one call of each case with its duration (device)")
    k.add_argument("cases", nargs="+")
    k.add_argument("--out", required=True, type=pathlib.Path)
    c = sub.add_parser("case", help="run one case three times (what ncu profiles)")
    c.add_argument("spec")
    c.add_argument("--marker", action="store_true", help=f"launch a {MARKER!r} kernel before the third call")
    s = sub.add_parser("stalls", help="print the stall table of an ncu source-page CSV")
    s.add_argument("csv", type=pathlib.Path)
    s.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    if args.cmd == "profile":
        profile(args.cases, args.out, args.top)
    elif args.cmd == "kernels":
        kernels(args.cases, args.out)
    elif args.cmd == "case":
        run_case(args.spec, args.marker)
    else:
        print(render_stalls(*stall_table(args.csv.read_text()), top=args.top))


if __name__ == "__main__":
    main()
