"""The GSPF selection kernels against their torch forms: on the CPU through Triton's interpreter
(what CI runs), and on a real GPU where one is present."""

KERNELS = r"""
import torch
from tkllm_ray.sparse import selection as S
from tkllm_ray.sparse import selection_triton as T
dev = "{device}"
g = torch.Generator().manual_seed(0)

# sums: fp32 within a block, fp64 across blocks
s = (torch.rand(3 * T.BLOCK + 77, generator=g) * 3).to(dev)
got = T.zsums(s).cpu()
want = torch.stack([s.double().sum(), s.double().square().sum()]).cpu()
torch.testing.assert_close(got, want, rtol=1e-6, atol=0)

# standardize and weigh in one pass: every range of |w| the tanh takes (series below 0.25, exp above)
w = torch.cat([torch.randn(5000, generator=g) * 0.02, torch.randn(5000, generator=g) * 2, torch.zeros(3),
               torch.tensor([0.25, -0.25, 0.2499, 30.0, -1e-30])]).to(dev, torch.bfloat16)
s = torch.rand(w.numel(), generator=g).to(dev)
want = (s.clone() - 0.4) / 1.7 * torch.tanh(w.float().abs())
got = T.weigh_(s, w, 0.4, 1.7)
assert got.data_ptr() == s.data_ptr()
torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-12)
assert bool((got[w.abs() == 0] == 0).all())  # tanh 0 is exactly 0: a zero weight scores 0

# counting and gathering the bracket: exact counts, the inside keys as a multiset, NaN/inf flagged
flats = [torch.randn(n, generator=g).to(dev) for n in (10000, 1, 4096, 9000)]
flats[0][:100] = 0.5  # ties at a bracket edge
flats[2][:50] = -0.0
flats[3][7], flats[3][9] = float("nan"), float("-inf")
lo, hi = int(S._order_key(torch.tensor([-0.3]))[0]), int(S._order_key(torch.tensor([0.5]))[0])
counts, keys, mods, total = T.count_and_gather(flats, lo, hi, cap=30000)
key = [S._order_key(f) for f in flats]  # a NaN's key too: it is flagged, wherever it counts
assert counts[:, 0].tolist() == [int((k > hi).sum()) for k in key]
assert counts[:, 1].tolist() == [int(((k >= lo) & (k <= hi)).sum()) for k in key]
assert counts[:, 2].tolist() == [0, 0, 0, 2]
n = int(total)
assert n == int(counts[:, 1].sum())
want = torch.cat([torch.stack([k[(k >= lo) & (k <= hi)], torch.full_like(k[(k >= lo) & (k <= hi)], i)], 1)
                  for i, k in enumerate(key)])
got = torch.stack([keys[:n], mods[:n]], 1)
assert torch.equal(got[torch.argsort(got[:, 0] * 8 + got[:, 1])].cpu(), want[torch.argsort(want[:, 0] * 8 + want[:, 1])].cpu())
_, _, _, total = T.count_and_gather(flats, lo, hi, cap=10)  # past the buffer: still counted
assert int(total) == n
print("ok")
"""

TOP_K = r"""
import torch
from tkllm_ray.sparse import selection as S
from tkllm_ray.sparse import selection_triton as T
dev = "{device}"
S.KERNELS_ON_CPU = True
S.SAMPLE = 2048  # the sampled bracket, as on a real model
g = torch.Generator().manual_seed(2)
sc = {{"a": torch.randn(40, 500, generator=g), "b": torch.randn(30000, generator=g), "c": torch.randn(9000, generator=g)}}
sc["a"].view(-1)[:300] = 1.25  # positive ties in two modules
sc["c"][:500] = 1.25
sc["b"][:400] = -0.5  # negative ties
sc = {{n: s.to(dev) for n, s in sc.items()}}
flat = torch.cat([s.flatten() for s in sc.values()]).cpu()
order = torch.sort(flat, descending=True, stable=True).indices
starts = {{"a": 0, "b": 20000, "c": 50000}}
calls = []
real = S._gathered_threshold
S._gathered_threshold = lambda f, k: calls.append(real(f, k)) or calls[-1]
for k in (1, 100, int((flat > 1.25).sum()) + 450, int((flat >= -0.5).sum()) - 70, flat.numel() - 5):
    got = S.top_k(sc, k)
    want = torch.sort(order[:k]).values
    assert torch.equal(torch.cat([got[n].cpu() + starts[n] for n in sc]), want), k
assert sum(c is not None for c in calls) >= 3, calls  # the kernels' path answered (edges may fall back)

# a full buffer falls back to the torch path, with the same answer
gather = T.count_and_gather
T.count_and_gather = lambda flats, lo, hi, cap: gather(flats, lo, hi, 8)
assert real({{n: s.flatten() for n, s in sc.items()}}, 2000) is None
got = S.top_k(sc, 2000)
assert torch.equal(torch.cat([got[n].cpu() + starts[n] for n in sc]), torch.sort(order[:2000]).values)
T.count_and_gather = gather

# NaN in the scores: the kernels' counting pass refuses it
sc["b"][17] = float("nan")
try:
    S.top_k(sc, 100)
    raise SystemExit("NaN accepted")
except ValueError as e:
    assert "NaN or infinite" in str(e)

# standardize + weigh through the kernels equals the torch forms (to rounding)
S.SAMPLE = 1 << 20
sens = {{n: torch.rand(s.shape, generator=g).to(dev) for n, s in [("a", sc["a"]), ("b", sc["b"])]}}
weights = {{"a": (torch.randn(40, 500, generator=g) * 0.05).to(dev, torch.bfloat16),
           "b": (torch.randn(30000, generator=g) * 0.05).to(dev, torch.bfloat16)}}
fused = S.scores({{n: s.clone() for n, s in sens.items()}}, weights, "global")
S.KERNELS_ON_CPU = False
ref = S.scores({{n: s.cpu() for n, s in sens.items()}}, {{n: w.cpu() for n, w in weights.items()}}, "global")
for n in sens:
    torch.testing.assert_close(fused[n].cpu(), ref[n], rtol=1e-5, atol=1e-6)

print("ok")
"""


def test_kernels_match_their_torch_forms(kernel_check):
    kernel_check(KERNELS)


def test_top_k_through_the_kernels_equals_the_torch_path(kernel_check):
    kernel_check(TOP_K)
