"""The GSPF object on the tiny model: learns, re-selects keeping learned values, exports."""

import torch

from tkllm_ray.models import build_model, fingerprint
from tkllm_ray.sparse.gspf import GSPF, GSPFSettings
from tkllm_ray.sparse.model import AppliedDelta, detach


def lm_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


def _data(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 300, (4, 16), generator=g) for _ in range(n)]


def test_gspf_learns_and_reselection_keeps_values():
    torch.manual_seed(0)
    model = build_model("tkllm-tiny", seed=11)
    base_fp = fingerprint(model)
    g = GSPF(model, lm_loss, GSPFSettings(density=0.01, lr=5e-2))
    data = _data()
    sel = g.sensitivity_select(data[:2])
    first = [g.step(b) for b in data]
    for _ in range(15):
        last = [g.step(b) for b in data]
    assert sum(last) < 0.9 * sum(first)  # it fits the data (random base, 1% of the linears)

    before = g.export()
    g.sensitivity_select(data[:2])
    after = g.export()
    assert g.state.history[-1]["entries"] == sel.k and 0 < g.state.history[-1]["overlap"] <= 1
    stay = 0
    for n, (idx, vals) in after.items():
        if n in before:
            common, ia, ib = _intersect(before[n][0], idx)
            assert torch.equal(vals[ib], before[n][1][ia])  # learned values survive re-selection
            stay += common
            fresh = torch.ones(idx.numel(), dtype=torch.bool)
            fresh[ib] = False
            assert torch.all(vals[fresh] == 0)  # new entries start at zero
    assert stay > 0
    # Loss with the exported delta scattered in equals the module path.
    with torch.no_grad():
        module_loss = lm_loss(model, data[0])
    delta = g.export()
    detach(model)
    assert fingerprint(model) == base_fp  # the base never changed during training
    applied = AppliedDelta(model, delta)
    with torch.no_grad():
        torch.testing.assert_close(lm_loss(model, data[0]), module_loss, rtol=1e-5, atol=1e-5)
    applied.restore()
    assert fingerprint(model) == base_fp


def _intersect(a, b):
    pos_a = {int(x): i for i, x in enumerate(a)}
    ia, ib = [], []
    for j, x in enumerate(b.tolist()):
        if x in pos_a:
            ia.append(pos_a[x])
            ib.append(j)
    return len(ia), torch.tensor(ia, dtype=torch.long), torch.tensor(ib, dtype=torch.long)
