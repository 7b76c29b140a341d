"""Serving's per-slot delta layout: the decode kernel over it gives each slot's row its own account's
W + Δ (interpreter on CPU, real GPU if present); reassigning slots rewrites regions in place (the
tensors a CUDA graph reads keep their addresses) until an account needs more room."""

import gc

import pytest
import torch

from tkllm_ray.serve.slots import SlotDeltas

CHECK = r"""
import torch
from torch import nn
from tkllm_ray.serve.slots import SlotDeltas
from tkllm_ray.sparse import segmented_triton as K
dev = "{device}"
K.CONFIG["decode"] = {{"LINES": 16, "BLOCK_E": 64, "num_warps": 4, "PREFETCH": PREFETCH}}  # blocks of several runs
g = torch.Generator().manual_seed(0)
slots = 5
lins = {{"n": nn.Linear(40, 24, bias=False).to(dev), "m": nn.Linear(64, 40, bias=False).to(dev)}}  # not in name order

def delta(k):  # k entries in m, k // 2 in n (none when that is 0)
    out = {{}}
    for name, kk in (("m", k), ("n", k // 2)):
        w = lins[name].weight
        if kk:
            idx = torch.sort(torch.randperm(w.numel(), generator=g)[:kk]).values
            out[name] = (idx.to(dev), torch.randn(kk, generator=g).to(dev))
    return out

def check(ctx, deltas, width=1):  # group i (deltas[i]) owns rows [i·width, (i+1)·width)
    for name, lin in lins.items():
        dout, din = lin.weight.shape
        x = torch.randn(len(deltas) * width, din, generator=g).to(dev)
        y0 = torch.randn(len(deltas) * width, dout, generator=g).to(dev)
        y = y0.clone()
        seg, vals = ctx.module_inputs(name, lin)
        K.add_forward(y, x, vals, seg)
        for i, d in enumerate(deltas):
            w = torch.zeros(dout * din, device=dev)
            if d is not None and name in d:
                w[d[name][0]] = d[name][1]
            rows = slice(i * width, (i + 1) * width)
            torch.testing.assert_close(y[rows], y0[rows] + x[rows] @ w.view(dout, din).T, rtol=1e-4, atol=1e-4)

table = SlotDeltas(slots, lins, torch.float32, torch.device(dev))
deltas = [delta(300), None, delta(1), delta(700), None]  # line blocks of more entries than BLOCK_E
assert table.assign(deltas) is True and table.cap == 2048  # grown from nothing to 700 + 350 entries
check(table, deltas)
held = [t.data_ptr() for t in (table.src, table.rows, table.ptr)]
deltas = [None, deltas[3], delta(90), deltas[3], delta(1)]  # moved, dropped, new: no more room needed
assert table.assign(deltas) is False
assert [t.data_ptr() for t in (table.src, table.rows, table.ptr)] == held
check(table, deltas)
deltas[0] = delta(1500)  # more entries than a slot's region holds: a new, larger pool
assert table.assign(deltas) is True and table.cap == 4096
check(table, deltas)
# A prefill: request i's rows (prompt width, then 1 for the last positions) in slot slots_[i],
# through the line-block kernel (wide) and the streaming one (narrow).
slots_, new = [3, 0], [delta(200), None]
view, grown = table.prefill(slots_, new)
assert grown is False and table.held[3] is new[0] and table.held[0] is None
for width in (1, 3, 20):
    view.tokens = width
    check(view, new, width)
# Accounts as the serving cache holds them (two flat buffers, modules in name order: taken as
# they are), one in another order and one empty (both laid out the general way).
from tkllm_ray.sparse.delta_store import FlatDelta

def flat(d, order=("m", "n")):
    names = [n for n in order if n in d]
    idx = torch.cat([d[n][0] for n in names]) if names else torch.empty(0, dtype=torch.int64, device=dev)
    vals = torch.cat([d[n][1] for n in names]) if names else torch.empty(0, device=dev)
    return FlatDelta(idx, vals, [(n, d[n][0].numel()) for n in names])

deltas = [flat(delta(300)), flat(delta(40), ("n", "m")), None, flat({{}}), flat(delta(9))]
assert table._flat(deltas[0]) is not None and table._flat(deltas[1]) is None
assert table.assign(deltas) is False
check(table, deltas)
assert table.assign([None] * slots) is False and not table.active
check(table, [None] * slots)
# line pointers: int32 (half the bytes the kernels read for lines' bounds); int64 on request
assert table.ptr.dtype == torch.int32
wide = SlotDeltas(slots, lins, torch.float32, torch.device(dev), wide_pointers=True)
deltas = [delta(300), None, delta(1), delta(700), None]
wide.assign(deltas)
assert wide.ptr.dtype == torch.int64
check(wide, deltas)
print("ok")
"""


GROUP_CHECK = r"""
import torch
from torch import nn
from tkllm_ray.serve.slots import SlotDeltas
from tkllm_ray.sparse import segmented_triton as K
dev = "{device}"
g = torch.Generator().manual_seed(1)
slots = 4
# q/k/v of a GQA layer (24, 8, 8 lines) read one input; o reads another. Pool order: k, o, q, v.
lins = {{"q": nn.Linear(40, 24, bias=False), "k": nn.Linear(40, 8, bias=False), "v": nn.Linear(40, 8, bias=False),
         "o": nn.Linear(24, 40, bias=False)}}
lins = {{n: m.to(dev) for n, m in lins.items()}}

def delta(k):
    out = {{}}
    for name, lin in lins.items():
        kk = min(k, lin.weight.numel())
        if kk and name != "v":  # v without entries for these accounts
            idx = torch.sort(torch.randperm(lin.weight.numel(), generator=g)[:kk]).values
            out[name] = (idx.to(dev), torch.randn(kk, generator=g).to(dev))
    return out

table = SlotDeltas(slots, lins, torch.float32, torch.device(dev))
deltas = [delta(120), None, delta(3), delta(200)]
table.assign(deltas)
members = (("q", 0), ("k", 24), ("v", 32))
x = torch.randn(slots, 40, generator=g).to(dev)
y0 = torch.randn(slots, 40, generator=g).to(dev)
want = y0.clone()
for s, d in enumerate(deltas):
    for name, col in members:
        if d is not None and name in d:
            dout = lins[name].weight.shape[0]
            w = torch.zeros(dout * 40, device=dev)
            w[d[name][0]] = d[name][1]
            want[s, col:col + dout] += x[s] @ w.view(dout, 40).T
for tiles in ({{"LINES": 16, "BLOCK_E": 64, "num_warps": 4}},  # q in two line blocks
              {{"LINES": 8, "BLOCK_E": 32, "num_warps": 2, "PREFETCH": True}}):  # lines over several chunks
    K.CONFIG["decode"] = tiles
    group = table.add_group(members)
    y = y0.clone()
    table.group_add(y, x, group)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    y = y0.clone()  # two modules (as gate/up): k's columns first this time, v's left as they were
    table.group_add(y, x, table.add_group((("k", 24), ("q", 0))))
    torch.testing.assert_close(y[:, :32], want[:, :32], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y[:, 32:], y0[:, 32:])
# A prefill: request i's `width` rows through slot order[i]. The group's one launch (one transpose
# of x) gives each request's rows its own account's terms, at the widths of both kernels: 16 and 32
# with every request's tokens starting on a multiple of 16 (aligned gathers), 3 and 20 without.
# Blocks over several chunks and token blocks. bf16 (one product a chunk) where a GPU runs it.
K.CONFIG["csr_prefill"] = {{"LINES": 16, "BLOCK_E": 16, "BLOCK_T": 16, "num_warps": 4}}
# The last request reads the pool's empty run (a prefill graph's padding row): no terms at all.
order = [3, 0, 1, slots]
for dt in [torch.float32] + ([torch.bfloat16] if dev == "cuda" else []):
    pool = SlotDeltas(slots, lins, dt, torch.device(dev))
    pool.prefill(order[:3], [deltas[s] for s in order[:3]])
    assert pool.empty_slot == slots
    view = pool.view(torch.tensor(order, device=dev))
    group = pool.add_group(members)
    tol = dict(rtol=1e-4, atol=1e-4) if dt == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    for width in (1, 3, 16, 20, 32):
        view.tokens = width
        x = torch.randn(len(order) * width, 40, generator=g).to(dev, dt)
        y0 = torch.randn(len(order) * width, 40, generator=g).to(dev, dt)
        want = y0.float().clone()  # (a copy in fp32 too)
        for i, s in enumerate(order):
            rows = slice(i * width, (i + 1) * width)
            for name, col in members:
                if s < slots and deltas[s] is not None and name in deltas[s]:
                    dout = lins[name].weight.shape[0]
                    w = torch.zeros(dout * 40, device=dev)
                    w[deltas[s][name][0]] = deltas[s][name][1].to(dt).float()
                    want[rows, col:col + dout] += x[rows].float() @ w.view(dout, 40).T
        y = y0.clone()
        view.group_add(y, x, group)
        torch.testing.assert_close(y.float(), want, **tol)
try:
    table.add_group((("q", 0), ("o", 24)))
    raise SystemExit("o reads another input: refused")
except ValueError as e:
    assert "read one input" in str(e)
try:
    table.add_group((("q", 0), ("k", 24), ("v", 32), ("q", 40)))
    raise SystemExit("four modules in one launch: refused")
except ValueError as e:
    assert "1 to 3 modules" in str(e)
print("ok")
"""


PACKED_CHECK = r"""
import torch
from torch import nn
from tkllm_ray.serve.slots import SlotDeltas
from tkllm_ray.sparse import segmented_triton as K
dev = "{device}"
K.CONFIG["decode"] = {{"LINES": 16, "BLOCK_E": 64, "num_warps": 4, "PREFETCH": True}}
g = torch.Generator().manual_seed(2)
slots, dt = 3, torch.float16
lins = {{"m": nn.Linear(64, 40, bias=False).to(dev), "n": nn.Linear(40, 24, bias=False).to(dev)}}

def delta(k):
    out = {{}}
    for name, lin in lins.items():
        idx = torch.sort(torch.randperm(lin.weight.numel(), generator=g)[:k]).values
        # values of both signs and a range of exponents: every bit of the 16 is carried
        scale = 4.0 ** torch.randint(-3, 3, (k,), generator=g)
        out[name] = (idx.to(dev), (torch.randn(k, generator=g) * scale).to(dev, dt))
    return out

packed, plain = (SlotDeltas(slots, lins, dt, torch.device(dev), pack=p) for p in (True, False))
assert packed.packed and packed.vals is None and packed.src.dtype == torch.int32
assert not plain.packed and plain.vals.dtype == dt
deltas = [delta(300), None, delta(700)]
for t in (packed, plain):
    t.assign(deltas)

def run(ctx, name, width):
    dout, din = lins[name].weight.shape
    gx = torch.Generator().manual_seed(width)
    x = torch.randn(slots * width, din, generator=gx).to(dev, dt)
    y = torch.zeros(slots * width, dout, device=dev, dtype=dt)
    seg, vals = ctx.module_inputs(name, lins[name])
    K.add_forward(y, x, vals, seg)
    return x, y

for name in lins:
    x, y = run(packed, name, 1)  # the decode kernel
    assert torch.equal(y, run(plain, name, 1)[1])  # the same sums from one load as from two
    for s, d in enumerate(deltas):
        w = torch.zeros(lins[name].weight.numel(), device=dev)
        if d is not None:
            w[d[name][0]] = d[name][1].float()
        want = x[s].float() @ w.view(lins[name].weight.shape).T
        torch.testing.assert_close(y[s].float(), want, rtol=2e-2, atol=2e-2)
    for width in (3, 20):  # a prefill: the line-block kernel (both widths through the packed entries)
        views = [t.prefill([0, 2], [deltas[0], deltas[2]])[0] for t in (packed, plain)]
        for v in views:
            v.tokens = width
        ys = []
        for v in views:
            gx = torch.Generator().manual_seed(width)
            x = torch.randn(2 * width, lins[name].weight.shape[1], generator=gx).to(dev, dt)
            y = torch.zeros(2 * width, lins[name].weight.shape[0], device=dev, dtype=dt)
            seg, vals = v.module_inputs(name, lins[name])
            K.add_forward(y, x, vals, seg)
            ys.append(y)
        torch.testing.assert_close(ys[0], ys[1], rtol=1e-3, atol=1e-3)
# fp32 values do not fit 16 bits: not packed
assert not SlotDeltas(slots, lins, torch.float32, torch.device(dev)).packed
try:
    K._packed(None, {{"packed": False}})
    raise SystemExit("values None on an unpacked plan: refused")
except ValueError as e:
    assert "not packed" in str(e)
print("ok")
"""


def test_packed_entries_give_the_sums_of_separate_columns_and_values(kernel_check):
    kernel_check(PACKED_CHECK)


@pytest.mark.parametrize("prefetch", [False, True])
def test_slot_regions_decode_each_rows_own_delta(kernel_check, prefetch):
    code = CHECK.replace('"PREFETCH": PREFETCH', f'"PREFETCH": {prefetch}')
    assert code != CHECK
    kernel_check(code)


def test_a_group_of_modules_decodes_and_prefills_in_one_launch(kernel_check):
    kernel_check(GROUP_CHECK)


def test_assign_needs_one_delta_per_slot():
    table = SlotDeltas(3, {"m": torch.nn.Linear(4, 4)}, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="one delta .or None. per slot: 3 slots, 2 given"):
        table.assign([None, None])


def test_layouts_of_served_accounts_are_kept_for_their_next_admission_within_a_budget():
    from tkllm_ray.sparse.delta_store import FlatDelta

    lins = {"a": torch.nn.Linear(8, 6), "b": torch.nn.Linear(8, 4)}
    g = torch.Generator().manual_seed(0)

    def account(k: int) -> FlatDelta:
        parts = [(n, torch.sort(torch.randperm(lins[n].weight.numel(), generator=g)[:k]).values) for n in ("a", "b")]
        return FlatDelta(torch.cat([i for _, i in parts]), torch.randn(2 * k, generator=g), [(n, k) for n, _ in parts])

    accounts = [account(5), account(7), account(9)]
    fresh = SlotDeltas(2, lins, torch.float32, torch.device("cpu"))  # no cache: laid out every time
    size = [sum(t.numel() * t.element_size() for t in fresh._layout(a)) for a in accounts]
    budget = size[1] + size[2]  # room for the two larger ones
    table = SlotDeltas(2, lins, torch.float32, torch.device("cpu"), layout_cache_bytes=budget)
    table.assign(accounts[:2])
    table.assign([None, None])
    table.assign(accounts[:2])  # both again: taken from the cache, the same pool contents
    assert table.stats == {"layouts": 2, "layout_hits": 2}
    fresh.assign(accounts[:2])
    for t in ("rows", "src", "vals", "ptr"):
        assert torch.equal(getattr(table, t), getattr(fresh, t))
    table.assign([accounts[2], None])  # a third does not fit beside two: the least recent goes
    assert list(table._laid) == [id(accounts[1]), id(accounts[2])] and table.layout_bytes == budget
    table.assign([None, None])
    del accounts[2]  # the serving cache let it go: its layout goes with it
    gc.collect()
    assert list(table._laid) == [id(accounts[1])]
    table.assign([{"a": (torch.tensor([1, 3]), torch.ones(2))}, None])  # a plain dict is laid out, not kept
    assert list(table._laid) == [id(accounts[1])]
