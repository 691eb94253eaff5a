"""The replay CLI, run as a subprocess exactly as documented."""
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "experiments.replay_trace", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_json_output_known_answer(tmp_path):
    # layer 0: [0] [1] [0] [2] [1] [0] (LRU 2 slots: 5 misses, Belady: 4); layer 1: [3,4] twice (2 misses)
    seq = [[0], [1], [0], [2], [1], [0]]
    rows = []
    for pos, ex in enumerate(seq):
        rows.append({"prompt": "p", "phase": "decode", "pos": pos, "layer": 0, "experts": ex})
        if pos < 2:
            rows.append({"prompt": "p", "phase": "decode", "pos": pos, "layer": 1, "experts": [3, 4],
                         "weights": [0.7, 0.3]})
    trace = tmp_path / "t.jsonl"
    write(trace, rows)
    p = cli(trace, "--policy", "lru", "--slots", 2, "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert list(out) == ["policy", "slots", "accesses", "misses", "hit_rate", "belady_hit_rate", "per_layer"]
    assert out["policy"] == "lru" and out["slots"] == 2
    assert (out["accesses"], out["misses"]) == (10, 7)
    assert out["hit_rate"] == 1 - 7 / 10
    assert out["belady_hit_rate"] == 1 - 6 / 10
    assert out["per_layer"] == [{"layer": 0, "accesses": 6, "misses": 5}, {"layer": 1, "accesses": 4, "misses": 2}]
    table = cli(trace, "--policy", "belady", "--slots", 2)
    assert table.returncode == 0 and "belady" in table.stdout and table.stdout.strip().splitlines()[-1].split()[0] \
        == "all"


def test_phase_cold_and_errors(tmp_path):
    rows = [{"prompt": "a", "phase": "prefill", "pos": 0, "layer": 0, "experts": [0]},
            {"prompt": "a", "phase": "decode", "pos": 1, "layer": 0, "experts": [0]},
            {"prompt": "b", "phase": "decode", "pos": 0, "layer": 0, "experts": [0]}]
    trace = tmp_path / "t.jsonl"
    write(trace, rows)
    out = json.loads(cli(trace, "--slots", 1, "--phase", "decode", "--json").stdout)
    assert (out["accesses"], out["misses"]) == (2, 1)
    out = json.loads(cli(trace, "--slots", 1, "--phase", "decode", "--per-prompt-cold", "--json").stdout)
    assert (out["accesses"], out["misses"]) == (2, 2)
    rows.append({"prompt": "a", "phase": "decode", "pos": 0, "layer": 0, "experts": [0]})
    write(trace, rows)
    p = cli(trace, "--slots", 1)
    assert p.returncode == 2 and f"{trace}:4" in p.stderr and "back in time" in p.stderr
