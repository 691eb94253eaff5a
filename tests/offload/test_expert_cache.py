"""Expert cache mechanics: exact equality with the all-resident call (every cache size, overflow included) for both
transfer paths ("rows", "stacked-jit"), transfer accounting, padded stacked-jit installs touching only their slots,
prefetch, disk bank, quantized bank, and a float64 numpy oracle for the routed FFN."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hlwq_jax.offload import expert_cache as X
from hlwq_jax.offload.bank import TRANSFERS, DiskBank, HostBank, transfer_length, transfer_lengths
from hlwq_jax.offload.expert_cache import LayerCache, cached_moe, plan_groups, routed_experts
from hlwq_jax.quant.hlwq import quantize

E, D, F, K, T = 8, 32, 24, 2, 5


def make_weights(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    up = rng.standard_normal((E, F, D)).astype(np.float32) / np.sqrt(D)
    down = rng.standard_normal((E, D, F)).astype(np.float32) / np.sqrt(F)
    return {"up_proj": jnp.asarray(up, dtype), "down_proj": jnp.asarray(down, dtype)}


def routing(rng, t=T):
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(t)]).astype(np.int32)
    w = rng.uniform(0.1, 1.0, (t, K)).astype(np.float32)
    return ids, w


def numpy_moe(x, ids, w, up, down):
    """float64 oracle: y[t] = Σ_j w[t,j] · down_e relu(up_e x[t])²."""
    x, up, down = (np.asarray(a, np.float64) for a in (x, up, down))
    y = np.zeros((x.shape[0], down.shape[1]))
    for t in range(x.shape[0]):
        for j, e in enumerate(ids[t]):
            y[t] += w[t, j] * down[e] @ (np.maximum(up[e] @ x[t], 0) ** 2)
    return y


def test_routed_ffn_matches_float64_oracle(rng):
    wts = make_weights()
    x = rng.standard_normal((T, D)).astype(np.float32)
    ids, w = routing(rng)
    got = routed_experts(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(w), wts)
    want = numpy_moe(x, ids, w, wts["up_proj"], wts["down_proj"])
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


def test_plan_groups_covers_and_fits():
    ids = np.array([[0, 1], [2, 3], [0, 2], [4, 5], [6, 7], [1, 0]])
    g = plan_groups(ids, 4)
    assert [list(x) for x in g] == [[0, 1, 2], [3, 4], [5]]
    assert plan_groups(ids, 8) and len(plan_groups(ids, 8)) == 1
    with pytest.raises(ValueError, match="3 distinct experts"):
        plan_groups(np.array([[0, 1, 2]]), 2)


_BANKS = {}


def bank_for(dtype_name, transfer="rows"):
    if (dtype_name, transfer) not in _BANKS:
        _BANKS[dtype_name, transfer] = HostBank(make_weights(1, getattr(jnp, dtype_name)), transfer=transfer)
    return _BANKS[dtype_name, transfer]


@pytest.mark.parametrize("transfer", TRANSFERS)
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), policy=st.sampled_from(["lru", "lfru", "lfru-fork", "lfu"]))
def test_cache_equals_all_resident_every_size(dtype_name, transfer, seed, policy):
    bank = bank_for(dtype_name, transfer)
    assert bank.transfer == transfer
    full = bank.all_resident()
    rng = np.random.default_rng(seed)
    calls = [routing(rng, t=T) for _ in range(3)]
    xs = [jnp.asarray(rng.standard_normal((len(i), D)), getattr(jnp, dtype_name)) for i, _ in calls]
    want = [routed_experts(x, jnp.asarray(i), jnp.asarray(w), full) for x, (i, w) in zip(xs, calls)]
    for slots in range(K, E + 1):
        cache = LayerCache(bank, slots, policy)
        for x, (i, w), ref in zip(xs, calls, want):
            got = cached_moe(cache, x, jnp.asarray(i), jnp.asarray(w))
            assert got.dtype == ref.dtype
            np.testing.assert_array_equal(np.asarray(got), np.asarray(ref), err_msg=f"slots={slots}")
        if slots == K:  # T tokens with 2 experts each on 2 slots: some call must be split into token groups
            assert cache.stats.groups > len(calls) and cache.stats.misses > 0
        assert cache.stats.pad_rows == 0 and cache.stats.bytes_moved == cache.stats.misses * bank.expert_nbytes


def test_transfer_accounting(monkeypatch):
    bank = bank_for("float32")
    calls = []
    real = jax.device_put

    def spy(x, *a, **kw):
        calls.append(len(x) if isinstance(x, list) else 1)
        return real(x, *a, **kw)

    cache = LayerCache(bank, 4, "lru")
    monkeypatch.setattr(jax, "device_put", spy)
    x = jnp.ones((1, D), jnp.float32)
    w = jnp.ones((1, K), jnp.float32)
    cached_moe(cache, x, jnp.asarray([[0, 1]]), w)
    assert calls == [2]  # one call: 2 experts, one contiguous row each (not one array per field)
    cached_moe(cache, x, jnp.asarray([[1, 0]]), w)
    assert calls == [2]  # all hits: no transfer
    cached_moe(cache, x, jnp.asarray([[2, 3]]), w)
    cached_moe(cache, x, jnp.asarray([[4, 0]]), w)  # evicts 1 (LRU), one expert moved
    assert calls == [2, 2, 1]
    s = cache.stats
    assert (s.hits, s.misses, s.transfers) == (3, 5, 3)
    assert s.bytes_moved == 5 * bank.expert_nbytes == 5 * 2 * F * D * 4
    assert set(np.flatnonzero(cache.slot_map() >= 0)) == {0, 2, 3, 4}


@pytest.mark.parametrize("transfer", TRANSFERS)
def test_overflow_prefill_groups_exact(rng, transfer):
    bank = bank_for("float32", transfer)
    full = bank.all_resident()
    ids = np.stack([np.roll(np.arange(E), -2 * t)[:K] for t in range(6)]).astype(np.int32)  # union = all 8
    ids = np.concatenate([ids, ids[::-1]])
    x = jnp.asarray(rng.standard_normal((len(ids), D)), jnp.float32)
    w = jnp.asarray(rng.uniform(size=ids.shape), jnp.float32)
    cache = LayerCache(bank, K, "lru")
    got = cached_moe(cache, x, jnp.asarray(ids), w)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(routed_experts(x, jnp.asarray(ids), w, full)))
    assert cache.stats.groups == len(ids) - 1  # tokens 5 and 6 share experts {2, 3}: one group


@pytest.mark.parametrize("transfer", TRANSFERS)
def test_prefetch_used_and_wasted(transfer):
    bank = bank_for("float32", transfer)
    cache = LayerCache(bank, 4, "lru")
    assert cache.prefetch([0, 1, 5]) == 3
    assert cache.prefetch([0]) == 0  # already staged
    before = cache.stats.transfers
    x, w = jnp.ones((1, D), jnp.float32), jnp.ones((1, K), jnp.float32)
    got = cached_moe(cache, x, jnp.asarray([[0, 1]]), w)
    assert cache.stats.transfers == before and cache.stats.prefetched == 2 and cache.stats.misses == 2
    np.testing.assert_array_equal(np.asarray(got), np.asarray(
        routed_experts(x, jnp.asarray([[0, 1]]), w, bank.all_resident())))
    cache.drop_staged()
    assert cache.stats.prefetch_wasted == 1


def _fields_numpy(weights):
    """The per-expert fields of a weight dict as numpy [E, ...] in bank order (sorted leaves; packed, norms)."""
    out = []
    for name in sorted(weights):
        w = weights[name]
        out += [np.asarray(w.packed), np.asarray(w.norms)] if hasattr(w, "packed") else [np.asarray(w)]
    return out


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "hlwq5"])
def test_expert_rows_split_back_bit_exact(kind, tmp_path):
    """A bank stores an expert as one uint8 row; fetching rows and splitting them (slice + bitcast, inside the jitted
    install) gives back every field bit for bit (numpy views of the original arrays are the oracle); the installed
    slot buffers and the all-resident weights equal the originals; a disk bank yields the same rows."""
    from hlwq_jax.offload.bank import expert_row, split_rows

    wts = make_weights(4, jnp.float32 if kind == "float32" else jnp.bfloat16)
    if kind == "hlwq5":
        wts = {k: quantize(v, bits=5, block_size=8) for k, v in wts.items()}  # packed uint8 + norms float16
    want = _fields_numpy(wts)
    bank = HostBank(wts)
    assert bank.expert_nbytes == sum(a[0].nbytes for a in want)
    rows = bank.fetch([5, 2])
    assert all(r.dtype == jnp.uint8 and r.shape == (bank.expert_nbytes,) for r in rows)
    np.testing.assert_array_equal(np.asarray(rows[0]), expert_row([a[5] for a in want]))
    got = split_rows(bank.specs, jnp.stack(rows))
    for g, a in zip(got, want):
        assert g.dtype == a.dtype and g.shape == (2, *a.shape[1:])
        np.testing.assert_array_equal(np.asarray(g).view(np.uint8), a[[5, 2]].view(np.uint8))
    cache = LayerCache(bank, 3)
    cache.ensure([5, 2, 7])
    for buf, a in zip(cache.buffers, want):
        for e, s in cache.slot_of.items():
            np.testing.assert_array_equal(np.asarray(buf[s]).view(np.uint8), a[e].view(np.uint8))
    full = bank.all_resident()
    for name, w in wts.items():
        a, b = (_fields_numpy({name: v}) for v in (w, full[name]))
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))
    DiskBank.save(tmp_path / "b", wts)
    np.testing.assert_array_equal(np.asarray(DiskBank(tmp_path / "b").fetch([3])[0]), np.asarray(bank.fetch([3])[0]))
    with pytest.raises(ValueError, match="uint8"):
        split_rows(bank.specs, jnp.stack(rows)[:, :-1])
    with pytest.raises(ValueError, match="row 0"):
        HostBank.from_rows(bank.specs, bank.layout, [jnp.zeros(3, jnp.uint8)])


def test_bank_memory_kind_and_errors():
    bank = bank_for("bfloat16")
    assert bank._rows[0].sharding.memory_kind == "pinned_host"
    assert bank.expert_nbytes == 2 * F * D * 2
    with pytest.raises(ValueError, match="outside"):
        bank.fetch([E])
    with pytest.raises(ValueError, match="stacked"):
        HostBank({"up_proj": jnp.zeros((F, D))})
    with pytest.raises(ValueError, match="experts, expected"):
        HostBank({"up_proj": jnp.zeros((E, F, D)), "down_proj": jnp.zeros((E + 1, D, F))})
    with pytest.raises(ValueError, match="memory kind"):
        HostBank(make_weights(), memory_kind="hbm")
    with pytest.raises(ValueError, match="unknown transfer"):
        HostBank(make_weights(), transfer="stacked")
    with pytest.raises(ValueError, match="stacked array"):
        bank.stacked  # a rows bank has none
    with pytest.raises(ValueError, match="slots"):
        LayerCache(bank, E + 1)
    cache = LayerCache(bank, 2)
    with pytest.raises(ValueError, match="routed ids"):
        cached_moe(cache, jnp.ones((1, D), jnp.bfloat16), jnp.asarray([[0, E]]), jnp.ones((1, K)))
    assert cache.policy.accesses == 0  # rejected before the policy saw it


def test_disk_bank_matches_host_bank(tmp_path, rng):
    wts = make_weights(2, jnp.bfloat16)
    DiskBank.save(tmp_path / "bank", wts)
    disk, host = DiskBank(tmp_path / "bank"), HostBank(wts)
    ids, w = routing(rng)
    x = jnp.asarray(rng.standard_normal((T, D)), jnp.bfloat16)
    a = cached_moe(LayerCache(disk, 3), x, jnp.asarray(ids), jnp.asarray(w))
    b = cached_moe(LayerCache(host, 3), x, jnp.asarray(ids), jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    (tmp_path / "bank" / "rows.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="rows.bin"):
        DiskBank(tmp_path / "bank")
    with pytest.raises(ValueError, match="manifest"):
        DiskBank(tmp_path)


def test_quantized_bank_exact_and_close_to_dequantized(rng, tmp_path):
    wts = make_weights(3)
    q = {k: quantize(v, bits=5, block_size=8) for k, v in wts.items()}
    bank = HostBank(q)
    assert bank.expert_nbytes < HostBank(wts).expert_nbytes / 3
    full = bank.all_resident()
    ids, w = routing(rng, t=6)
    x = jnp.asarray(rng.standard_normal((6, D)), jnp.float32)
    ref = routed_experts(x, jnp.asarray(ids), jnp.asarray(w), full)
    for slots in (K, 5, E):
        got = cached_moe(LayerCache(bank, slots), x, jnp.asarray(ids), jnp.asarray(w))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    stacked = HostBank(q, transfer="stacked-jit")  # the in-jit gather splits HLWQ rows (uint8 + float16) the same way
    for slots in (5,):
        got = cached_moe(LayerCache(stacked, slots), x, jnp.asarray(ids), jnp.asarray(w))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    deq = {k: np.asarray(v.dequantize(jnp.float32)) for k, v in q.items()}
    np.testing.assert_allclose(np.asarray(ref), numpy_moe(x, ids, w, deq["up_proj"], deq["down_proj"]),
                               rtol=1e-4, atol=1e-4)
    DiskBank.save(tmp_path / "qbank", q)
    got = cached_moe(LayerCache(DiskBank(tmp_path / "qbank"), 3), x, jnp.asarray(ids), jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_transfer_lengths():
    """Exact lengths up to EXACT_LENGTHS (no padded copy in batch-1 decode), then powers of two capped at C."""
    assert [transfer_length(m, 8) for m in range(1, 9)] == list(range(1, 9))
    assert (transfer_length(9, 16), transfer_length(9, 12), transfer_length(17, 64), transfer_length(33)) == \
        (16, 12, 32, 64)
    assert transfer_lengths(8) == list(range(1, 9)) and transfer_lengths(20) == [*range(1, 9), 16, 20]
    assert all(transfer_length(m, c) >= m for c in range(1, 70) for m in range(1, c + 1))
    with pytest.raises(ValueError, match="m <= cap"):
        transfer_length(5, 4)


def test_stacked_bank_layout_and_errors(tmp_path):
    """A stacked-jit bank is ONE pinned-host uint8 [E, expert_nbytes] array whose row e is expert e's row (numpy
    oracle: ``expert_row``); its fetch and all-resident weights equal the rows bank's bit for bit; a disk bank refuses
    stacked-jit."""
    from hlwq_jax.offload.bank import expert_row

    wts = {k: quantize(v, bits=5, block_size=8) for k, v in make_weights(5).items()}
    rows, stacked = HostBank(wts, transfer="rows"), HostBank(wts)  # stacked-jit is the default
    want = _fields_numpy(wts)
    st_ = stacked.stacked
    assert st_.sharding.memory_kind == "pinned_host" and st_.shape == (E, stacked.expert_nbytes)
    assert stacked.host_arrays == [st_] and len(rows.host_arrays) == E
    np.testing.assert_array_equal(np.asarray(st_), np.stack([expert_row([a[e] for a in want]) for e in range(E)]))
    for a, b in zip(stacked.fetch([6, 0, 6]), rows.fetch([6, 0, 6])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert stacked.fetch([]) == []
    for name in wts:
        for x, y in zip(*(_fields_numpy({name: b.all_resident()[name]}) for b in (stacked, rows))):
            np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))
    with pytest.raises(ValueError, match="outside"):
        stacked.fetch([E])
    with pytest.raises(ValueError, match="no per-expert host rows"):
        stacked._host_row(0)
    with pytest.raises(ValueError, match="numpy uint8"):
        HostBank.from_stacked(stacked.specs, stacked.layout, np.zeros((E, 3), np.uint8))
    DiskBank.save(tmp_path / "b", wts)
    assert DiskBank(tmp_path / "b", transfer="rows").transfer == "rows"
    with pytest.raises(ValueError, match="disk bank: transfer 'stacked-jit' is not supported"):
        DiskBank(tmp_path / "b", transfer="stacked-jit")
    with pytest.raises(ValueError, match="unknown transfer"):
        DiskBank(tmp_path / "b", transfer="gather")


def test_padded_stacked_install_touches_exactly_the_intended_slots(monkeypatch):
    """The gather-install writes expert rows into exactly the listed slots and leaves every other slot's bytes as
    they were (sentinel bytes), padded entries (slot C) included — called directly and through a cache whose miss
    list (9 misses on 16 slots) is padded to 16 (7 wasted rows, counted). One call per step with misses, none for
    an all-hit step, no host-level device_put."""
    from hlwq_jax.offload.bank import expert_row

    e2, c = 20, 16
    rng = np.random.default_rng(3)
    wts = {"up_proj": jnp.asarray(rng.standard_normal((e2, F, D)), jnp.bfloat16),
           "down_proj": jnp.asarray(rng.standard_normal((e2, D, F)), jnp.bfloat16)}
    bank = HostBank(wts, transfer="stacked-jit")
    want = [expert_row([a[e] for a in _fields_numpy(wts)]) for e in range(e2)]

    def slot_bytes(buffers):  # per slot, the bytes of all its fields ([C, expert_nbytes], like a row)
        return np.concatenate([np.asarray(b).view(np.uint8).reshape(c, -1) for b in buffers], axis=1)

    sentinel = [jnp.asarray(rng.integers(0, 2**16, (c, *s.shape), np.uint16), jnp.bfloat16) for s in bank.specs]
    before = slot_bytes(sentinel)
    idx = np.asarray([[7, 2, 19, 2, 2], [5, 0, 11, c, c]], np.int32)  # 3 real entries, 2 padded
    after = slot_bytes(X._gather_install(tuple(sentinel), bank.stacked, idx, specs=tuple(bank.specs)))
    for s in range(c):
        expect = {5: want[7], 0: want[2], 11: want[19]}.get(s, before[s])
        np.testing.assert_array_equal(after[s], expect, f"slot {s}")

    calls, puts, real, real_put = [], [], X._gather_install, jax.device_put
    cache = LayerCache(bank, c)
    monkeypatch.setattr(X, "_gather_install",
                        lambda b, st_, i, **kw: calls.append(np.array(i)) or real(b, st_, i, **kw))

    def put(x, *a, **kw):  # count host-level calls only, not the traced in-jit ones
        if not isinstance(x, jax.core.Tracer):
            puts.append(1)
        return real_put(x, *a, **kw)

    monkeypatch.setattr(jax, "device_put", put)
    cache.ensure([3, 4])
    first = slot_bytes(cache.buffers)
    misses = [10, 11, 12, 13, 14, 15, 16, 17, 18]
    cache.ensure(misses + [3])  # 9 misses -> padded to 16
    cache.ensure([3, 4, 10])  # all hits: no call
    assert [len(i[0]) for i in calls] == [2, 16] and puts == []
    assert (calls[1][1] == c).sum() == 7 and sorted(calls[1][0][:9]) == misses
    assert (cache.stats.transfers, cache.stats.pad_rows, cache.stats.misses) == (2, 7, 11)
    assert cache.stats.bytes_moved == (2 + 16) * bank.expert_nbytes
    got = slot_bytes(cache.buffers)
    for e, s in cache.slot_of.items():
        np.testing.assert_array_equal(got[s], want[e], f"expert {e}")
    for s in set(range(c)) - set(cache.slot_of.values()):  # free slots: untouched by the padded install
        np.testing.assert_array_equal(got[s], first[s], f"free slot {s}")
