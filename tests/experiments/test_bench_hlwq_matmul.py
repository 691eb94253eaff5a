"""bench_hlwq_matmul --suite xla plumbing on the CPU: the new row kinds (dequant only, rotation only, pre-rotated xla)
count the bytes they move, and the xla table renders ratios against the bf16 row of the same shape and M."""
import json

from experiments import bench_hlwq_matmul as bench
from hlwq_jax.ops.hlwq_matmul import XlaConfig


def test_xla_rows_and_render(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "INTERPRET", True)
    monkeypatch.setattr(bench, "SHAPES", {"in_proj": (300, 200)})
    rows = [dict(op="meta", suite="xla", command="test", date="d", device="cpu", jax="x", git="g")]
    record = rows.append
    bench.run_dense(record, "in_proj", 1, "bf16", label="bf16 warm-up")
    bench.run_dense(record, "in_proj", 1, "bf16")
    bench.run_dense(record, "in_proj", 1, "xla", 5, XlaConfig(), label="xla Q5", count_kernels=True)
    bench.run_dense(record, "in_proj", 1, "xla", 5, XlaConfig(), rotated=True, label="xla Q5 pre-rotated")
    bench.run_dense(record, "in_proj", 4, "dequant", 5, XlaConfig(), label="dequant only", count_kernels=True)
    bench.run_dense(record, "in_proj", 2, "rotate", 5, XlaConfig(), label="rotation only")
    bench.run_dense(record, "in_proj", 1, "nonsense", 5)  # recorded as an error row, not raised
    by_label = {r.get("label"): r for r in rows}
    assert all("time_us" in by_label[k] for k in ("bf16", "xla Q5", "xla Q5 pre-rotated"))
    n_pad = 384  # 300 features padded to 3 blocks of 128
    codes_norms = 200 * (n_pad * 5 // 8) + 200 * 3 * 2 + 32 * 4  # packed codes + fp16 norms + f32 codebook
    deq = by_label["dequant only"]
    assert deq["weight_bytes"] == codes_norms
    assert abs(deq["gbps"] * deq["time_us"] * 1e3 - (codes_norms + 200 * n_pad * 2)) < 1e-3 * codes_norms
    rot = by_label["rotation only"]
    assert abs(rot["gbps"] * rot["time_us"] * 1e3 - (2 * 300 * 2 + 2 * n_pad * 4)) < 1.0
    assert deq["hlo_kernels"] >= 1 and by_label["xla Q5"]["hlo_kernels"] >= 1
    assert rows[-1]["op"] == "error" and "nonsense" in rows[-1]["error"]

    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = bench.render(str(path))
    table = [line for line in text.splitlines() if line.startswith("| dense | in_proj")]
    assert len(table) == 5 and not any("warm-up" in line for line in table)
    q5 = next(line for line in table if "| xla Q5 |" in line)
    ratio = by_label["xla Q5"]["time_us"] / by_label["bf16"]["time_us"]
    assert f"{ratio:.2f}×" in q5
    assert "1 errors" in text


def test_hlo_kernel_count_sees_through_command_buffers():
    """GPU modules wrap kernels in a command-buffer computation reached by `call`; fusion bodies and reducers are
    not kernels."""
    text = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused_computation (p0: f32[8]) -> f32[] {
  %p0 = f32[8]{0} parameter(0)
  %c = f32[] constant(0)
  ROOT %r = f32[] reduce(%p0, %c), dimensions={0}, to_apply=%add
}

%command_buffer (p: f32[8], q: f32[8,8]) -> (f32[], f32[8,8]) {
  %p = f32[8]{0} parameter(0)
  %q = f32[8,8]{1,0} parameter(1)
  %f = f32[] fusion(%p), kind=kInput, calls=%fused_computation
  %g = (f32[8,8]{1,0}, s8[64]{0}) custom-call(%q, %q), custom_call_target="__cublas$gemm"
  %e = f32[8,8]{1,0} get-tuple-element(%g), index=0
  ROOT %t = (f32[], f32[8,8]) tuple(%f, %e)
}

ENTRY %main (x: f32[8], y: f32[8,8]) -> f32[8,8] {
  %x = f32[8]{0} parameter(0)
  %y = f32[8,8]{1,0} parameter(1)
  %cb = (f32[], f32[8,8]) call(%x, %y), to_apply=%command_buffer
  %o = f32[8,8]{1,0} get-tuple-element(%cb), index=1
  ROOT %z = f32[8,8]{1,0} copy(%o)
}
"""
    assert bench.hlo_kernel_count(text) == 3  # the fusion, the cuBLAS custom call, the copy
