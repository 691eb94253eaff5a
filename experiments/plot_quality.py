"""Quality table + plot from perplexity JSON lines: `python -m experiments.plot_quality RESULTS.jsonl
[--png results/quality_ppl.png] [--table results/quality_table.md] [--stats results/quality_table_tensor_stats.jsonl]`.

The PNG draws PPL vs bits/weight per method (one panel per model; BF16 as a dashed line; points above 4× the
BF16 PPL are drawn at that edge and labelled with their value). The markdown table lists
every (model, quant) with ΔPPL vs BF16 and checks the issue-4 targets, stating by how much a missed one is missed:
  Q5: ΔPPL(hlwq5) ≤ 1% of BF16 PPL;  Q4: ΔPPL(hlwq4) ≤ 0.6 × ΔPPL(rtn4-g128) and < ΔPPL(nf4);
  converged codebook no worse than the original at 5 and 6 bits.
The latest line wins when a (model, quant, protocol, window, windows) key repeats; smoke lines are skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib

CAVEAT = ("Caveat: the BF16 baseline is the 4-bit GGUF model dequantized (SmolLM2-135M: Q4_1 with 32-blocks; "
          "Gemma-3-270M: Q4_K_M mix of Q4_K/Q5_0/Q6_K/Q8_0). Methods whose grid contains that 4-bit grid "
          "(asymmetric 4-bit with 32-blocks, say) get an unfair advantage; every ΔPPL here is relative to an "
          "already-quantized model.")


def read_records(path) -> list[dict]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file {path} not found")
    latest = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from e
        if r.get("smoke"):
            continue
        latest[(r["model"], r["quant"], r["protocol"], r["window"], r["windows"])] = r
    return list(latest.values())


def method_of(quant: str) -> str:
    """Series label for the plot: hlwq variants by codebook/rotation/block, baselines by name."""
    if not quant.startswith("hlwq"):
        return quant
    parts = quant.split("-")[1:]
    if not parts:
        return "hlwq (converged)"
    if parts[0].startswith("b"):
        return "hlwq b-sweep"
    return "hlwq-" + "-".join(parts)


def deltas(records: list[dict]) -> dict:
    """{(model, protocol, window, windows): {quant: (ppl, dppl, dppl_pct)}} against that group's bf16 row."""
    groups: dict = {}
    for r in records:
        groups.setdefault((r["model"], r["protocol"], r["window"], r["windows"]), {})[r["quant"]] = r["ppl"]
    out = {}
    for key, ppls in groups.items():
        base = ppls.get("bf16")
        out[key] = {q: (p, None if base is None else p - base, None if base is None else 100 * (p / base - 1))
                    for q, p in ppls.items()}
    return out


def check_targets(d: dict) -> list[str]:
    """Issue-4 quality targets per group; a missed target says by how much."""
    lines = []
    for (model, proto, win, nwin), q in sorted(d.items()):
        if "bf16" not in q:
            continue
        tag = f"{model} ({proto} {win}, {nwin} windows)"
        if "hlwq5" in q:
            pct = q["hlwq5"][2]
            lines.append(f"- {tag}: HLWQ Q5 ΔPPL {pct:+.3f}% of BF16 (target ≤ 1%): "
                         + ("met" if pct <= 1.0 else f"MISSED by {pct - 1.0:.3f} points"))
        if "hlwq4" in q and "rtn4-g128" in q:
            d4, drtn = q["hlwq4"][1], q["rtn4-g128"][1]
            lines.append(f"- {tag}: HLWQ Q4 ΔPPL {d4:+.4f} vs 0.6 × RTN-g128 ΔPPL {0.6 * drtn:+.4f}: "
                         + ("met" if d4 <= 0.6 * drtn else f"MISSED by {d4 - 0.6 * drtn:.4f} PPL "
                                                            f"(ratio {d4 / drtn if drtn else float('inf'):.2f})"))
        if "hlwq4" in q and "nf4" in q:
            d4, dnf = q["hlwq4"][1], q["nf4"][1]
            lines.append(f"- {tag}: HLWQ Q4 ΔPPL {d4:+.4f} vs NF4 {dnf:+.4f} (target below): "
                         + ("met" if d4 < dnf else f"MISSED by {d4 - dnf:.4f} PPL"))
        for b in (5, 6):
            c, o = q.get(f"hlwq{b}"), q.get(f"hlwq{b}-orig")
            if c and o:
                lines.append(f"- {tag}: Q{b} converged {c[0]:.4f} vs original codebook {o[0]:.4f} (target ≤): "
                             + ("met" if c[0] <= o[0] else f"MISSED by {c[0] - o[0]:.4f} PPL"))
    return lines


def stats_lines(path) -> list[str]:
    """Fraction of HLWQ Q4 tensors whose relative MSE is within 10% of the Gaussian Lloyd-Max value, per model."""
    path = pathlib.Path(path)
    if not path.is_file():
        return [f"(no per-tensor statistics file {path})"]
    by = {}
    for line in path.read_text().splitlines():
        if line.strip():
            s = json.loads(line)
            by.setdefault((s["model"], s["quant"]), []).append(s["lloyd_max_ratio"])
    out = []
    for (model, quant), ratios in sorted(by.items()):
        within = sum(abs(r - 1.0) <= 0.10 for r in ratios)
        out.append(f"- {model} {quant}: {within}/{len(ratios)} tensors ({100 * within / len(ratios):.1f}%) within "
                   f"10% of Lloyd-Max; rel-MSE / Lloyd-Max ratio min {min(ratios):.3f}, max {max(ratios):.3f}")
    return out


def markdown(records: list[dict], stats_path=None, title: str = "WikiText-2 test perplexity under weight quantizers"
             ) -> str:
    d = deltas(records)
    rows = ["| model | quant | protocol | window | windows | tokens | BOS | bits/w | PPL | ΔPPL | ΔPPL % |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["model"], r["protocol"], r["window"], r["bits_per_weight"] or 99,
                                            r["quant"])):
        _, dp, pct = d[(r["model"], r["protocol"], r["window"], r["windows"])][r["quant"]]
        bpw = f"{r['bits_per_weight']:.3f}" if r["bits_per_weight"] is not None else "-"
        rows.append(f"| {r['model']} | {r['quant']} | {r['protocol']} | {r['window']} | {r['windows']} | "
                    f"{r['tokens']} | {'yes' if r['bos'] else 'no'} | {bpw} | {r['ppl']:.4f} | "
                    + (f"{dp:+.4f} | {pct:+.2f} |" if dp is not None else "- | - |"))
    prov = sorted({(r.get("git_sha"), r.get("jax_version"), r.get("device")) for r in records})
    text = [f"# {title}", "", CAVEAT, "",
            "Quantized: every linear weight in the blocks (attention q/k/v/o, MLP gate/up/down); embeddings (tied "
            "LM head) and norms unquantized. bits/w counts codes + scales, with padding of `in` to the block.", "",
            *rows, "", "## Targets (issue 4)", "", *(check_targets(d) or ["- (no BF16 rows)"]), "",
            "## Per-tensor statistics", "", *(stats_lines(stats_path) if stats_path else ["(not given)"]), "",
            "Provenance (git SHA, jax, device): " + "; ".join(", ".join(map(str, p)) for p in prov), ""]
    return "\n".join(text)


def plot(records: list[dict], png) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({r["model"] for r in records})
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        rs = [r for r in records if r["model"] == model and r["bits_per_weight"] is not None]
        series: dict = {}
        base = [r["ppl"] for r in rs if r["quant"] == "bf16"]
        top = 4.0 * base[0] if base else max(r["ppl"] for r in rs) * 1.1     # keep the useful range readable
        for r in rs:
            if r["quant"] in ("bf16", "fp16", "fp32"):
                ax.axhline(r["ppl"], ls="--" if r["quant"] == "bf16" else ":", c="k" if r["quant"] == "bf16" else "gray",
                           lw=1, label=f"{r['quant']} ({r['ppl']:.2f})")
                continue
            series.setdefault(method_of(r["quant"]), []).append(r)
        for name, pts in sorted(series.items()):
            pts.sort(key=lambda r: r["bits_per_weight"])
            ys = [min(r["ppl"], top) for r in pts]
            ax.plot([r["bits_per_weight"] for r in pts], ys, "o-" if len(pts) > 1 else "s", label=name, ms=5)
            for r, y in zip(pts, ys):
                label = r["quant"] if r["ppl"] <= top else f"{r['quant']} (off scale: {r['ppl']:.4g})"
                ax.annotate(label, (r["bits_per_weight"], y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if base:
            ax.set_ylim(0.95 * min(r["ppl"] for r in rs), top * 1.05)
        ax.set_yscale("log")
        ax.set_xlabel("bits / weight (quantized linears)")
        ax.set_ylabel("WikiText-2 test PPL")
        proto = {(r["protocol"], r["window"]) for r in rs}
        ax.set_title(f"{model}  {', '.join(f'{p} {w}' for p, w in sorted(proto))}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = pathlib.Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    os.replace(tmp, png)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.plot_quality", description=__doc__.split("\n")[0])
    p.add_argument("results")
    p.add_argument("--png", default=None)
    p.add_argument("--table", default=None)
    p.add_argument("--stats", default=None, help="per-tensor stats jsonl written by experiments.sweep")
    p.add_argument("--title", default="WikiText-2 test perplexity under weight quantizers")
    a = p.parse_args(argv)
    records = read_records(a.results)
    if not records:
        raise ValueError(f"{a.results}: no (non-smoke) result lines")
    md = markdown(records, a.stats, a.title)
    if a.table:
        t = pathlib.Path(a.table)
        t.parent.mkdir(parents=True, exist_ok=True)
        tmp = t.with_name(f".{t.name}.tmp{os.getpid()}")
        tmp.write_text(md)
        os.replace(tmp, t)
    if a.png:
        plot(records, a.png)
    print(md)


if __name__ == "__main__":
    main()
