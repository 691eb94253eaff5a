"""scripts/kernel_sass.py: the SASS histogram parser, and the CPU-side lowering of the decode GEMV to Triton IR (the
part that needs no Triton install; compiling to SASS needs one and is not run here)."""
from __future__ import annotations

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import kernel_sass  # noqa: E402

SASS = """
        /*0040*/                   LDG.E.128 R4, desc[UR8][R2.64] ;                  /* 0x0000000802047981 */
                                                                                     /* 0x000ea2000c1e1d00 */
        /*0050*/                   SHFL.IDX PT, R9, R5, R8, 0x1f ;                   /* 0x00001f0805097589 */
        /*0060*/               @!P0 BRA 0x200 ;                                      /* 0x0000000000008947 */
        /*0070*/                   FFMA R7, R9, R6, R7 ;                             /* 0x0000000609077223 */
        /*0080*/                   SHFL.IDX PT, R10, R5, R11, 0x1f ;                 /* 0x00001f0b050a7589 */
"""


def test_sass_histogram_counts_opcodes_without_modifiers_or_predicates():
    assert kernel_sass.sass_histogram(SASS) == {"SHFL": 2, "LDG": 1, "BRA": 1, "FFMA": 1}


def test_loop_histograms_take_the_backward_branch_range():
    (start, end, hist), = kernel_sass.loop_histograms(SASS.replace("0x200", "0x50"))
    assert (start, end) == (0x50, 0x60) and hist == {"SHFL": 1, "BRA": 1}
    assert kernel_sass.loop_histograms(SASS) == []  # a forward branch is no loop


def test_gemv_lowers_to_one_triton_module_with_a_lane_shuffle():
    code = ("import sys; sys.path.insert(0, 'scripts'); import kernel_sass; "
            "t = kernel_sass.lower_ttir(5, 300, 1000, 0, dict(rows=1, min_programs=1)); "
            "print(len(t), t[0][1], 'shfl.sync.idx.b32' in t[0][0] and 'scf.for' in t[0][0])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["1", "True"]
