"""diag_injit_miss --small on CPU: every measurement row comes back per flag set, the in-jit install wrote the
requested bank rows into the requested slots, and a worker that exceeds its limit is killed with its rows kept."""
import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def run(tmp_path, *extra):
    out = tmp_path / "d.jsonl"
    p = subprocess.run([sys.executable, "-m", "experiments.diag_injit_miss", "--small", "--reps", "2", "--out",
                        str(out), *extra], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr[-2000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_rows_and_install_check(tmp_path):
    rows = run(tmp_path, "--flags", "default")
    assert not [r for r in rows if "error" in r]
    kinds = [(r["what"], r["bank"]) for r in rows]
    for bank in ("bf16", "q5"):  # 4 copy sizes, 7 switch branches, 3 layer programs
        assert [k for k in kinds if k[1] == bank] == [("copy_k", bank)] * 4 + [("switch_n", bank)] * 7 + \
            [("layers", bank)] * 3
    assert all(r["rows_ok"] for r in rows if r["what"] == "copy_k")
    assert all(r["ms"] > 0 for r in rows if "ms" in r) and all(r["flags"] == "default" for r in rows)
    assert all(r["device"] and r["jax"] for r in rows)


def test_hung_worker_is_killed_and_recorded(tmp_path):
    rows = run(tmp_path, "--flags", "default", "--timeout-s", "0.5")
    err = [r for r in rows if "error" in r]
    assert len(err) == 1 and err[0]["flags"] == "default" and err[0]["error"].startswith("rc ")
