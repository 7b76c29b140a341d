"""The main job on the bundled sample, end to end on local Ray and CPU.

At this stage of the product: synthetic creators + the real samples under ../shared/data ->
ingest (validate, quarantine, dedupe, time split, tokenize) -> context images -> packed GSPF
fine-tunes of the synthetic creators on Ray Train workers (tiny model), one delta each, and the
`tkllm serve` command that serves them.
"""

from __future__ import annotations

import json
import os

from tkllm_ray.config.ingest import IngestConfig, InputSpec, RenderConfig
from tkllm_ray.data.ingest import run_ingest
from tkllm_ray.data.samples import sample_inputs
from tkllm_ray.data.summary import format_summary
from tkllm_ray.data.synth import generate_records, write_jsonl


def run_quickstart(workdir: str = "runs/quickstart", modes: list[str] | None = None, finetune: bool = True) -> int:
    workdir = os.path.abspath(workdir)
    synth_path = os.path.join(workdir, "raw", "synth.jsonl")
    records = generate_records(n_accounts=8, posts_per_account=120, seed=0)
    write_jsonl(records, synth_path)
    steps = 3 if finetune else 2
    print(f"[1/{steps}] synthetic creators: {len(records)} posts of 8 accounts -> {synth_path}")
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
    print(f"[2/{steps}] ingest + context images on local Ray ...")
    summary = run_ingest(cfg)
    print()
    print(format_summary(summary))
    print()
    print(f"dataset:  {summary['output']}  (train/ eval/ quarantine/ images/ summary.json)")
    example = os.path.join(summary["output"], "images", summary["per_account"][0]["account_id"])
    print(f"images:   {example}/ ...")
    if finetune:
        synth = {r["authorMeta"]["name"] for r in records}
        kept = sorted(a["account_id"] for a in summary["per_account"] if a["account_id"] in synth)
        summary["finetune"] = _finetune(workdir, summary["output"], kept)
    with open(os.path.join(workdir, "quickstart-summary.json"), "w") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False, default=str)
    return 0


def _finetune(workdir: str, dataset: str, accounts: list[str]) -> dict:
    from tkllm_ray.config.finetune import FinetuneConfig
    from tkllm_ray.train.packed_job import run_packed_finetune

    listing = os.path.join(workdir, "accounts.txt")
    with open(listing, "w") as f:
        f.write("\n".join(accounts) + "\n")
    cfg = FinetuneConfig(accounts=listing, data=dataset, output=os.path.join(workdir, "deltas"), epochs=2, seq_len=64,
                         batch_size=8, warmup_steps=2, workers=2, max_resident=8, max_rows=32)
    print(f"\n[3/3] GSPF {cfg.density:.1%} fine-tunes of the {len(accounts)} synthetic creators, packed on "
          f"{cfg.workers} Ray Train workers ...")
    r = run_packed_finetune(cfg)
    for a in r["per_account"]:
        print(f"  {a['account']:<28} held-out ppl {a['eval_ppl_before']:8.1f} -> {a['eval_ppl_after']:7.1f}   "
              f"{a['trainable_params']:,} entries")
    print(f"deltas:   {cfg.output}/<account>/LATEST  ({r['accounts']} accounts in {r['wall_s']:.0f} s)")
    print(f"serve:    tkllm serve --config configs/serve/local.yaml --deltas {cfg.output}   "
          f"(model \"tkllm-tiny:{r['per_account'][0]['account']}\" on :8000/v1/completions)")
    return {k: v for k, v in r.items() if k != "per_account"}
