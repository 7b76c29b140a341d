"""The fused RMSNorm (models/fused_norm.py) computes the Llama module's norm."""

import copy

import torch

from tkllm_ray.models import build_model
from tkllm_ray.models.fused_norm import fuse_rms_norms


def test_fused_norms_give_the_modules_outputs_and_gradients():
    model = build_model("tkllm-tiny", seed=0)
    for norm in model.modules():
        if type(norm).__name__.endswith("RMSNorm"):
            norm.weight.data.uniform_(0.5, 1.5)  # not all ones: the weight must be applied
    fused = copy.deepcopy(model)
    assert fuse_rms_norms(fused) == 2 * model.config.num_hidden_layers + 1
    assert all("forward" in vars(m) for m in fused.modules() if type(m).__name__.endswith("RMSNorm"))
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    want, got = model(input_ids=ids).logits, fused(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    x = torch.randn(4, model.config.hidden_size, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    norm, fnorm = model.model.norm, fused.model.norm
    norm(x).square().sum().backward()
    fnorm(x2).square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
    xb = torch.randn(64, model.config.hidden_size).to(torch.bfloat16)
    nb, fb = copy.deepcopy(norm).to(torch.bfloat16), copy.deepcopy(fnorm).to(torch.bfloat16)
    torch.testing.assert_close(fb(xb).float(), nb(xb).float(), rtol=1.6e-2, atol=1e-2)  # one bf16 rounding apart


def test_a_norm_whose_weight_zero3_manages_keeps_its_forward():
    model = build_model("tkllm-tiny", seed=0)
    model.model.norm.weight.ds_id = 7  # as DeepSpeed marks a partitioned parameter
    assert fuse_rms_norms(model) == 2 * model.config.num_hidden_layers
    assert "forward" not in vars(model.model.norm)
