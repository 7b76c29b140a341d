"""The main job on the bundled sample, end to end on local Ray and CPU.

Synthetic creators + the real samples under ../shared/data -> ingest (validate, quarantine,
dedupe, time split, tokenize) -> context images -> packed GSPF fine-tunes of the synthetic
creators on Ray Train workers (tiny model), one delta each -> the serving endpoint (Ray Serve,
real HTTP on 127.0.0.1) asked for a caption by each account's model and by the base, side by side
-> stopped cleanly (or kept up with --keep-serving).
"""

from __future__ import annotations

import json
import os

from tkllm_ray.config.ingest import IngestConfig, InputSpec, RenderConfig
from tkllm_ray.data.ingest import run_ingest
from tkllm_ray.data.samples import sample_inputs
from tkllm_ray.data.summary import format_summary
from tkllm_ray.data.synth import generate_records, write_jsonl


def run_quickstart(workdir: str = "runs/quickstart", modes: list[str] | None = None, finetune: bool = True,
                   keep_serving: bool = False) -> int:
    workdir = os.path.abspath(workdir)
    synth_path = os.path.join(workdir, "raw", "synth.jsonl")
    records = generate_records(n_accounts=8, posts_per_account=120, seed=0)
    write_jsonl(records, synth_path)
    steps = 4 if finetune else 2
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
        summary["finetune"] = _finetune(workdir, summary["output"], kept, steps)
        summary["serve"] = _serve_and_ask(summary["finetune"]["deltas"], kept, keep_serving)
    with open(os.path.join(workdir, "quickstart-summary.json"), "w") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False, default=str)
    return 0


def _finetune(workdir: str, dataset: str, accounts: list[str], steps: int) -> dict:
    from tkllm_ray.config.finetune import FinetuneConfig
    from tkllm_ray.train.packed_job import run_packed_finetune

    listing = os.path.join(workdir, "accounts.txt")
    with open(listing, "w") as f:
        f.write("\n".join(accounts) + "\n")
    cfg = FinetuneConfig(accounts=listing, data=dataset, output=os.path.join(workdir, "deltas"), epochs=2, seq_len=64,
                         batch_size=8, warmup_steps=2, workers=2, max_resident=8, max_rows=32)
    print(f"\n[3/{steps}] GSPF {cfg.density:.1%} fine-tunes of the {len(accounts)} synthetic creators, packed on "
          f"{cfg.workers} Ray Train workers ...")
    r = run_packed_finetune(cfg)
    for a in r["per_account"]:
        print(f"  {a['account']:<28} held-out ppl {a['eval_ppl_before']:8.1f} -> {a['eval_ppl_after']:7.1f}   "
              f"{a['trainable_params']:,} entries")
    print(f"deltas:   {cfg.output}/<account>/LATEST  ({r['accounts']} accounts in {r['wall_s']:.0f} s)")
    return {**{k: v for k, v in r.items() if k != "per_account"}, "deltas": cfg.output}


PROMPT = "Today on the channel:"
NEW_TOKENS = 16


def _serve_and_ask(deltas: str, accounts: list[str], keep_serving: bool) -> dict:
    """Start the endpoint on a free loopback port, ask the base and each account's model for a
    caption over HTTP (greedy, same prompt), print them side by side, then stop Serve."""
    import socket
    import time

    from ray import serve

    from tkllm_ray.serve.app import app_builder

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    print(f"\n[4/4] serving tkllm-tiny + the {len(accounts)} deltas at http://127.0.0.1:{port}/v1 (Ray Serve) ...")
    t0 = time.time()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    serve.run(app_builder({"model": "tkllm-tiny", "deltas": deltas, "base_name": "tkllm-tiny",
                           "allow_anonymous": True, "device": "cpu"}), name="tkllm", route_prefix="/",
              logging_config={"log_level": "WARNING", "enable_access_log": False})
    url = f"http://127.0.0.1:{port}/v1/completions"
    answers = {name: _complete(url, name) for name in ["tkllm-tiny", *(f"tkllm-tiny:{a}" for a in accounts)]}
    width = max(map(len, answers))
    print(f"  prompt: {PROMPT!r}, greedy, {NEW_TOKENS} new tokens")
    for name, text in answers.items():
        print(f"  {name:<{width}}  {text!r}")
    out = {"url": url, "prompt": PROMPT, "answers": answers, "serve_s": round(time.time() - t0, 1)}
    if keep_serving:
        print(f"\nstill serving at {url} (model \"tkllm-tiny:{accounts[0]}\"); Ctrl-C stops")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    serve.shutdown()
    print("endpoint stopped")
    return out


def _complete(url: str, model: str) -> str:
    import urllib.request

    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0}).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())["choices"][0]["text"]
