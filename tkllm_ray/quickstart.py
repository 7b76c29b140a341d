"""The main job on the bundled sample, end to end on local Ray and CPU.

At this stage of the product: synthetic creators + the real samples under ../shared/data ->
ingest (validate, quarantine, dedupe, time split, tokenize) -> context images. Fine-tuning and
serving join this same command as they land.
"""

from __future__ import annotations

import json
import os

from tkllm_ray.config.ingest import IngestConfig, InputSpec, RenderConfig
from tkllm_ray.data.ingest import run_ingest
from tkllm_ray.data.samples import sample_inputs
from tkllm_ray.data.summary import format_summary
from tkllm_ray.data.synth import generate_records, write_jsonl


def run_quickstart(workdir: str = "runs/quickstart", modes: list[str] | None = None) -> int:
    workdir = os.path.abspath(workdir)
    synth_path = os.path.join(workdir, "raw", "synth.jsonl")
    records = generate_records(n_accounts=8, posts_per_account=120, seed=0)
    write_jsonl(records, synth_path)
    print(f"[1/2] synthetic creators: {len(records)} posts of 8 accounts -> {synth_path}")
    inputs = [InputSpec(uri=synth_path)] + [InputSpec(**s) for s in sample_inputs()]
    if len(inputs) == 1:
        print("      (../shared/data not found: the real samples are skipped; set TKLLM_SHARED_DATA)")
    for spec in inputs[1:]:
        print(f"      real sample: {spec.uri}")
    cfg = IngestConfig(
        inputs=inputs,
        output=os.path.join(workdir, "dataset"),
        render=RenderConfig(modes=modes or ["tiny", "base", "hifi"]),
    )
    print("[2/2] ingest + context images on local Ray ...")
    summary = run_ingest(cfg)
    print()
    print(format_summary(summary))
    print()
    print(f"dataset:  {summary['output']}  (train/ eval/ quarantine/ images/ summary.json)")
    example = os.path.join(summary["output"], "images", summary["per_account"][0]["account_id"])
    print(f"images:   {example}/ ...")
    with open(os.path.join(workdir, "quickstart-summary.json"), "w") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
    return 0
