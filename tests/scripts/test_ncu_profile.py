"""scripts/ncu_profile.py: the case-spec parser and the stall table read from ncu's source-page CSV (running ncu
needs the device machine and is not done here)."""
from __future__ import annotations

import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import ncu_profile  # noqa: E402

# the shape of `ncu --page source --csv --print-source sass`: a kernel-name line, the header, one row per instruction
HEADER = ('"Address","Source","Warp Stall Sampling (All Samples)","# Samples","Instructions Executed",'
          '"stall_long_sb","stall_mio","stall_barrier","stall_long_sb (Not Issued)"')
CSV = '"Kernel Name","hlwq_dot_q5",\n' + HEADER + '''
"0x7f00","      LDG.E R2, desc[UR4][R2.64]","3","3","64","1","2","0","9"
"0x7f10","      SHFL.IDX PT, R5, R4, R3, 0x1f","10","10","4096","0","7","3","9"
"0x7f20","      WARPGROUP.DEPBAR.LE gsb0, 0x0","6","6","64","0","","6","9"
'''


def test_stall_table_sums_each_reason_and_sorts_lines_by_samples():
    totals, rows = ncu_profile.stall_table(CSV)
    assert totals == {"long_sb": 1, "mio": 9, "barrier": 9}  # "(Not Issued)" columns are a subset, not added
    assert [r["address"] for r in rows] == ["0x7f10", "0x7f20", "0x7f00"]
    assert rows[0]["source"] == "SHFL.IDX PT, R5, R4, R3, 0x1f" and rows[0]["executed"] == 4096
    text = ncu_profile.render_stalls(totals, rows, top=2)
    assert "| mio | 9 | 47.4 % |" in text and "LDG.E" not in text  # top=2 leaves the third line out


def test_stall_table_rejects_other_csv():
    with pytest.raises(ValueError, match="not an ncu source-page CSV"):
        ncu_profile.stall_table('"a","b"\n"1","2"\n')
    with pytest.raises(ValueError, match="stall_"):
        ncu_profile.stall_table('"Address","Source","# Samples"\n"0x1","NOP","0"\n')


@pytest.mark.parametrize("spec, want", [
    ("dense:lm_head:16", ("dense", dict(shape="lm_head", m=16, bits=5))),
    ("dense:in_proj:1:4", ("dense", dict(shape="in_proj", m=1, bits=4))),
    ("grouped", ("grouped", dict(bits=5))),
    ("decode:3", ("decode", dict(bits=3))),
])
def test_parse_case(spec, want):
    assert ncu_profile.parse_case(spec) == want


@pytest.mark.parametrize("spec, match", [("dense:lm_head", "dense:SHAPE:M"), ("gemv:1", "kind must be"),
                                         ("grouped:5:1", r"grouped\[:BITS\]"), ("decode:9", "bits must be")])
def test_parse_case_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        ncu_profile.parse_case(spec)


# `ncu --csv --metrics gpu__time_duration.sum`: ==PROF== lines, the header, one row per kernel launch
COLUMNS = ("ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream", "Block Size",
           "Grid Size", "Device", "CC", "Section Name", "Metric Name", "Metric Unit", "Metric Value")
METRICS = '''==PROF== Connected to process 1 (/usr/bin/python3.12)
==PROF== Disconnected from process 1
''' + ",".join(f'"{c}"' for c in COLUMNS) + '''
"0","1","python3.12","h","loop_add_fusion","1","14","(1, 1, 1)","(1, 1, 1)","0","9.0","m","gpu__time_duration.sum","ns","2,048"
"1","1","python3.12","h","ncu_call_marker","1","14","(32, 1, 1)","(1, 1, 1)","0","9.0","m","gpu__time_duration.sum","ns","1,500"
"2","1","python3.12","h","hlwq_gemv_q5","1","14","(32, 1, 1)","(1, 480, 6)","0","9.0","m","gpu__time_duration.sum","us","15.01"
"3","1","python3.12","h","ncu_call_marker","1","14","(32, 1, 1)","(1, 1, 1)","0","9.0","m","gpu__time_duration.sum","ns","1,400"
"4","1","python3.12","h","loop_select_fusion","1","14","(1, 1, 1)","(1, 1, 1)","0","9.0","m","gpu__time_duration.sum","ns","2,496"
"5","1","python3.12","h","hlwq_gemv_q5","1","14","(32, 1, 1)","(1, 480, 6)","0","9.0","m","gpu__time_duration.sum","ms","0.015008"
'''


def test_kernel_list_is_what_follows_the_last_marker_in_microseconds():
    ks = ncu_profile.kernel_list(METRICS)
    assert ks == [("loop_select_fusion", pytest.approx(2.496)), ("hlwq_gemv_q5", pytest.approx(15.008))]
    text = ncu_profile.render_kernels(ks)
    assert text.startswith("2 kernels, 17.5 µs") and "| hlwq_gemv_q5 | 15.01 |" in text


def test_kernel_list_errors():
    with pytest.raises(ValueError, match="ncu_call_marker"):
        ncu_profile.kernel_list(METRICS.replace("ncu_call_marker", "other"))
    with pytest.raises(ValueError, match="not ncu --csv"):
        ncu_profile.kernel_list("==PROF== nothing\n")
    with pytest.raises(ValueError, match="unknown duration unit 'cycle'"):
        ncu_profile.kernel_list(METRICS.replace('"us","15.01"', '"cycle","15"'))


def test_marker_kernel_runs_in_interpret_mode():
    import numpy as np
    np.testing.assert_array_equal(np.asarray(ncu_profile.marker_kernel(interpret=True)), np.ones(16, np.float32))
