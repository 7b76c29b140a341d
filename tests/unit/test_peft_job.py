"""The peft baseline as a job of its own (benchmarks/peft_job.py): a fresh process loads the base
from its directory, trains LoRA with transformers' Trainer and saves an adapter peft loads back."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from tkllm_ray.models import build_model


def test_a_peft_job_saves_an_adapter_that_loads_on_the_base(tmp_path):
    from peft import PeftModel

    base = build_model("tkllm-tiny", seed=0)
    base.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    (tmp_path / "posts.json").write_text(json.dumps(torch.randint(2, 400, (6, 9), generator=g).tolist()))
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "peft_job.py"
    subprocess.run([sys.executable, str(script), "--base", str(tmp_path / "base"), "--posts", str(tmp_path / "posts.json"),
                    "--out", str(tmp_path / "adapter"), "--epochs", "1", "--batch", "3"], check=True, timeout=300)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["peft_type"] == "LORA"
    model = PeftModel.from_pretrained(build_model("tkllm-tiny", seed=0), str(tmp_path / "adapter"))
    trained = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert trained and any(bool(p.abs().sum() > 0) for p in trained)  # B starts at zero: it trained
