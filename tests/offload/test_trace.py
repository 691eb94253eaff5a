"""Trace format: round trip, validation errors naming the line, recorder ordering, per-layer replay."""
import json

import numpy as np
import pytest

from hlwq_jax.offload import trace as T


def rec(prompt="p", phase="decode", pos=0, layer=0, experts=(0, 1), weights=None):
    return T.TraceRecord(prompt, phase, pos, layer, tuple(experts), weights)


def test_round_trip(tmp_path):
    recs = [rec(phase="prefill", pos=0, layer=0, weights=(0.5, 0.25)), rec(phase="prefill", pos=0, layer=3),
            rec("q", pos=7, layer=1, experts=(4,)), rec(phase="decode", pos=1, layer=0, experts=(2, 9))]
    path = tmp_path / "t.jsonl"
    T.write_trace(path, recs)
    assert T.read_trace(path) == recs
    first = json.loads(path.read_text().splitlines()[0])
    assert first == {"prompt": "p", "phase": "prefill", "pos": 0, "layer": 0, "experts": [0, 1],
                     "weights": [0.5, 0.25]}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".trace-")]


@pytest.mark.parametrize("line, msg", [
    ('{"prompt": "p", "phase": "decode", "pos": 0, "layer": 0}', "missing field"),
    ('{"prompt": "p", "phase": "decode", "pos": 0, "layer": 0, "experts": [1], "extra": 1}', "unknown field"),
    ('{"prompt": "p", "phase": "train", "pos": 0, "layer": 0, "experts": [1]}', "'phase'"),
    ('{"prompt": "p", "phase": "decode", "pos": -1, "layer": 0, "experts": [1]}', "'pos'"),
    ('{"prompt": "p", "phase": "decode", "pos": 0, "layer": true, "experts": [1]}', "'layer'"),
    ('{"prompt": "p", "phase": "decode", "pos": 0, "layer": 0, "experts": [1, 1]}', "repeats"),
    ('{"prompt": "p", "phase": "decode", "pos": 0, "layer": 0, "experts": []}', "'experts'"),
    ('{"prompt": "p", "phase": "decode", "pos": 0, "layer": 0, "experts": [1], "weights": [1, 2]}', "'weights'"),
    ('{"prompt": 3, "phase": "decode", "pos": 0, "layer": 0, "experts": [1]}', "'prompt'"),
    ('{"prompt": "p", "phase": "decode", "pos": 0, "layer": 0, "experts": [1]', "not valid JSON"),
    ('{"prompt": "p", "phase": "decode", "pos": 5, "layer": 0, "experts": [1]}', "back in time"),
    ('{"prompt": "p", "phase": "decode", "pos": 5, "layer": 1, "experts": [1]}', "back in time"),
    ('{"prompt": "p", "phase": "prefill", "pos": 6, "layer": 0, "experts": [1]}', "prefill line after a decode"),
])
def test_validation_names_the_line(tmp_path, line, msg):
    good = '{"prompt": "p", "phase": "decode", "pos": 5, "layer": 1, "experts": [0, 2]}'
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=msg) as e:
        T.read_trace(path)
    assert f"{path}:3" in str(e.value)


def test_recorder_orders_and_validates(tmp_path):
    r = T.TraceRecorder()
    r.record("a", "prefill", 0, 1, np.array([[3, 4], [5, 6]]), np.array([[0.5, 0.5], [0.25, 0.75]]))
    r.record("a", "prefill", 0, 0, np.array([[0, 1], [1, 2]]))
    r.record("a", "decode", 2, 0, np.array([7, 8]))
    got = [(x.phase, x.pos, x.layer, x.experts) for x in r.records()]
    assert got == [("prefill", 0, 0, (0, 1)), ("prefill", 0, 1, (3, 4)), ("prefill", 1, 0, (1, 2)),
                   ("prefill", 1, 1, (5, 6)), ("decode", 2, 0, (7, 8))]
    r.write(tmp_path / "r.jsonl")
    assert len(T.read_trace(tmp_path / "r.jsonl")) == 5
    with pytest.raises(ValueError, match="repeats"):
        r.record("a", "decode", 3, 0, np.array([[1, 1]]))


def test_replay_per_layer_phase_and_cold():
    recs = [rec("a", "prefill", 0, 0, (0,)), rec("a", "decode", 1, 0, (1,)), rec("a", "decode", 1, 1, (5,)),
            rec("a", "decode", 2, 0, (0,)), rec("b", "decode", 0, 0, (1,)), rec("b", "decode", 0, 1, (5,))]
    # layer 0 steps: [0] [1] [0] [1] with 2 slots -> 2 misses; layer 1: [5] [5] -> 1 miss
    got = T.replay_records(recs, "lru", 2)
    assert [(r.layer, r.accesses, r.misses) for r in got] == [(0, 4, 2), (1, 2, 1)]
    # decode only: layer 0 steps [1] [0] [1] -> 2 misses
    assert T.replay_records(recs, "lru", 2, phase="decode")[0].misses == 2
    # per-prompt cold: prompt b starts cold -> layer 0: a:[0][1][0] 2 misses + b:[1] 1; layer 1: 1 + 1
    got = T.replay_records(recs, "lru", 2, per_prompt_cold=True)
    assert [(r.layer, r.misses) for r in got] == [(0, 3), (1, 2)]
    with pytest.raises(ValueError, match="layer 0"):
        T.replay_records([rec(experts=(0, 1, 2))], "lru", 2)


def test_replay_counts_after_warmup():
    recs = [rec(pos=p, layer=0, experts=(e,)) for p, e in enumerate([0, 1, 0, 2, 1, 0])]
    # LRU 2 slots: misses at steps 0 1 3 4 5; counting from pos 3 -> steps 3 4 5 -> 3 accesses, 3 misses
    assert [(r.accesses, r.misses) for r in T.replay_records(recs, "lru", 2, count_from_pos=3)] == [(3, 3)]
    assert [(r.accesses, r.misses) for r in T.replay_records(recs, "belady", 2, count_from_pos=3)] == [(3, 2)]
    assert T.replay_records(recs, "lru", 2, count_from_pos=10)[0].accesses == 0
