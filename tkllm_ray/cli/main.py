"""`tkllm`: the command line. Each subcommand's options come from its job config."""

from __future__ import annotations

import argparse
import json
import sys

from tkllm_ray.cli import jobs_cmd, orchestrate_cmd
from tkllm_ray.cli.options import Parser, add_model_options, overrides_from_args
from tkllm_ray.config.base import load_config
from tkllm_ray.config.finetune import FinetuneConfig
from tkllm_ray.config.ingest import IngestConfig
from tkllm_ray.config.serve import ServeConfig
from tkllm_ray.errors import TkllmError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tkllm", description="Per-creator sparse fine-tuning and serving on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    parser.subparsers = sub.choices  # so errors can name the subcommand

    p = sub.add_parser("ingest", help="validate, split, tokenize and render raw posts into a dataset",
                       description="Ray Data ingestion: raw posts (JSONL/CSV/Parquet, local or s3://) -> "
                                   "a versioned dataset partitioned by account, with context images.")
    p.add_argument("--config", metavar="FILE", help="YAML file with IngestConfig fields; options below override it")
    p.add_argument("--input", dest="inputs", action="append", metavar="URI", default=argparse.SUPPRESS,
                   help="posts file, directory or s3:// prefix (repeatable)")
    add_model_options(p, IngestConfig, skip=("inputs",))
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    p.add_argument("--no-progress", action="store_true", help="turn Ray Data's progress bars off")

    p = sub.add_parser("finetune", help="fine-tune one account (any method) or many (packed on Ray Train)",
                       description="Fine-tune from an ingested dataset: --account ID trains one account with "
                                   "gspf/full/lora/dora/adapter/diffpruning/ts-lora/ts-dora; --accounts all|FILE packs "
                                   "many accounts' fine-tunes (gspf, ts-lora, ts-dora, dora) onto Ray Train workers. "
                                   "Held-out perplexity before and after; the delta or adapters version (sparse and "
                                   "token-selective methods) or model/adapter directory is published.")
    p.add_argument("--config", metavar="FILE", help="YAML file with FinetuneConfig fields; options below override it")
    add_model_options(p, FinetuneConfig)
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("experts", help="train the MoE style experts (one per genre) and their router",
                       description="From an ingested dataset's genre column: a GSPF expert per genre on its pooled "
                                   "posts and a top-k router, published under --output for `serve` (experts: URI).")
    p.add_argument("--config", metavar="FILE", help="YAML file with FinetuneConfig fields; options below override it")
    add_model_options(p, FinetuneConfig, skip=("account", "accounts", "method"))
    p.add_argument("--top-k", type=int, default=1, help="domains the router mixes per request (default: 1)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("serve", help="serve the base and every account's delta over HTTP (local Ray Serve)",
                       description="OpenAI-style /v1/completions and /v1/chat/completions; model = '<base>' or "
                                   "'<base>:<account>'. Runs until interrupted. On a cluster: serve deploy "
                                   "cluster/serve.yaml.")
    p.add_argument("--config", metavar="FILE", help="YAML file with ServeConfig fields; options below override it")
    add_model_options(p, ServeConfig)

    p = sub.add_parser("merge", help="merge an account's sparse delta into its base: a standalone HF model dir",
                       description="W + Δ saved with save_pretrained (and the tokenizer) for users who want a plain "
                                   "Hugging Face model instead of base + delta. The base must be the one trained on.")
    p.add_argument("--deltas", required=True, metavar="URI", help="delta store root (path or s3://)")
    p.add_argument("--account", required=True, help="account id")
    p.add_argument("--output", required=True, metavar="URI", help="new directory for the merged model (path or s3://)")
    p.add_argument("--version", help="delta version (default: the latest)")
    p.add_argument("--model", help="base model (default: the one the delta's manifest names)")
    p.add_argument("--tokenizer", default="builtin", help="tokenizer the account was trained with (default: builtin)")
    p.add_argument("--seed", type=int, default=0, help="seed of a random-init preset base (default: 0)")

    p = sub.add_parser("synth", help="write synthetic multi-account posts (TikTok-export style JSONL)")
    p.add_argument("--output", required=True, metavar="URI", help="JSONL file to write (path or s3://)")
    p.add_argument("--accounts", type=int, default=8, help="number of accounts (default: 8)")
    p.add_argument("--posts", type=int, default=120, help="posts per account (default: 120)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")

    p = sub.add_parser("quickstart", help="the whole product on the bundled sample (local Ray, CPU): ingest, "
                       "packed fine-tunes, the endpoint asked by each account's model")
    p.add_argument("--workdir", default="runs/quickstart", help="where to write everything (default: runs/quickstart)")
    p.add_argument("--modes", nargs="+", default=["tiny", "base", "hifi"], choices=["tiny", "base", "hifi"],
                   help="OCC rendering modes (default: all three)")
    p.add_argument("--skip-finetune", action="store_true", help="stop after ingest (no fine-tunes, no endpoint)")
    p.add_argument("--keep-serving", action="store_true", help="leave the endpoint up at the end (Ctrl-C stops)")

    p = sub.add_parser("tokenizer-train", help="train the byte-level BPE tokenizer on a text corpus")
    p.add_argument("--corpus", nargs="+", required=True, help="text files, one document per line")
    p.add_argument("--output", required=True, help="directory to save the Hugging Face tokenizer in")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size (default: 8192)")
    p.add_argument("--synth-accounts", type=int, default=16,
                   help="synthetic creators whose posts join the corpus (default: 16, as the builtin tokenizer)")
    p.add_argument("--synth-posts", type=int, default=300, help="posts per synthetic creator (default: 300)")

    jobs_cmd.add_parsers(sub)  # submit, jobs
    orchestrate_cmd.add_parsers(sub)  # retrain, deltas
    return parser


def cmd_ingest(args) -> int:
    from tkllm_ray.data.ingest import run_ingest
    from tkllm_ray.data.summary import format_summary

    over = overrides_from_args(args, IngestConfig)  # --input lands in "inputs" directly
    cfg = load_config(IngestConfig, args.config, over) if args.config else _validate(IngestConfig, over)
    summary = run_ingest(cfg, progress=False if args.no_progress else None)
    print(json.dumps(summary, indent=2, ensure_ascii=False) if args.json else format_summary(summary))
    return 0


def _validate(model, data: dict):
    from pydantic import ValidationError

    from tkllm_ray.config.base import format_validation_error

    missing = [n for n, f in model.model_fields.items() if f.is_required() and n not in data]
    if missing:
        flags = ", ".join("--" + ("input" if n == "inputs" else n.replace("_", "-")) for n in missing)
        raise TkllmError(f"missing required option(s): {flags} (or pass --config FILE)")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise TkllmError(format_validation_error(e, "from the command line")) from None


def cmd_finetune(args) -> int:
    from tkllm_ray.train.single import run_finetune

    over = overrides_from_args(args, FinetuneConfig)
    cfg = load_config(FinetuneConfig, args.config, over) if args.config else _validate(FinetuneConfig, over)
    if cfg.packed:
        return _finetune_packed(cfg, args.json)
    r = run_finetune(cfg)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"{r['account']} [{r['method']}] trainable {r['trainable_params']:,} params, {r['steps']} steps "
              f"({r['step_time_s'] * 1000:.0f} ms/step on {r['device']})")
        print(f"  held-out perplexity {r['eval_ppl_before']:.2f} -> {r['eval_ppl_after']:.2f}")
        print(f"  published: {r.get('delta_uri') or r.get('model_uri')}")
    return 0


def _finetune_packed(cfg: FinetuneConfig, as_json: bool) -> int:
    from tkllm_ray.train.packed_job import run_packed_finetune

    r = run_packed_finetune(cfg)
    if as_json:
        print(json.dumps(r, indent=2, default=str))
        return 0
    gains = [a["eval_ppl_before"] - a["eval_ppl_after"] for a in r["per_account"]]
    print(f"{r['accounts']} accounts on {r['workers']} worker(s) in {r['wall_s']:.0f} s "
          f"({r['accounts_per_hour']:.0f} accounts/hour, {r['train_tokens_per_s']:.0f} train tokens/s)")
    what = "deltas" if cfg.method == "gspf" else f"{cfg.method} adapters"
    print(f"  held-out perplexity gain: mean {sum(gains) / len(gains):.2f}; {what} under {cfg.output}")
    return 0


def cmd_experts(args) -> int:
    from tkllm_ray.serve.experts import train_experts_from_dataset

    over = {**overrides_from_args(args, FinetuneConfig), "account": "experts", "method": "gspf"}
    cfg = load_config(FinetuneConfig, args.config, over) if args.config else _validate(FinetuneConfig, over)
    r = train_experts_from_dataset(cfg, cfg.output, args.top_k)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    for d in r["domains"]:
        m = r["experts"][d]
        print(f"  {d:<28} held-out ppl {m['eval_ppl_before']:8.1f} -> {m['eval_ppl_after']:8.1f}")
    print(f"router held-out accuracy {r['router_heldout_accuracy']:.2f}; experts under {cfg.output} "
          f"(serve them with experts: {cfg.output})")
    return 0


def cmd_merge(args) -> int:
    from tkllm_ray.config.storage import StorageOptions
    from tkllm_ray.sparse.merge import merge_delta

    info = merge_delta(args.deltas, args.account, args.output, model=args.model, tokenizer=args.tokenizer,
                       version=args.version, seed=args.seed, options=StorageOptions())
    print(f"merged {info['entries']:,} entries of {args.account} ({info['method']}, version {info['version']}) "
          f"into {info['base_model']}: {info['output']}")
    return 0


def cmd_synth(args) -> int:
    from tkllm_ray.data.synth import generate_records, write_jsonl

    records = generate_records(args.accounts, args.posts, args.seed)
    write_jsonl(records, args.output)
    print(f"wrote {len(records)} posts of {args.accounts} accounts to {args.output}")
    return 0


def cmd_quickstart(args) -> int:
    from tkllm_ray.quickstart import run_quickstart

    return run_quickstart(args.workdir, modes=args.modes, finetune=not args.skip_finetune,
                          keep_serving=args.keep_serving)


def cmd_tokenizer_train(args) -> int:
    from tkllm_ray.data.synth import generate_records
    from tkllm_ray.data.tokenizer import train_tokenizer

    def lines():
        for path in args.corpus:
            with open(path, encoding="utf-8") as f:
                yield from (line.rstrip("\n") for line in f)
        yield from (r["desc"] for r in generate_records(args.synth_accounts, args.synth_posts, seed=123))

    train_tokenizer(lines(), args.output, args.vocab_size)
    print(f"tokenizer saved to {args.output}")
    return 0


def cmd_serve(args) -> int:
    from ray import serve

    from tkllm_ray.data.ingest import ensure_ray
    from tkllm_ray.serve.app import app_builder

    over = overrides_from_args(args, ServeConfig)
    cfg = load_config(ServeConfig, args.config, over) if args.config else _validate(ServeConfig, over)
    ensure_ray()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(app_builder(cfg.model_dump()), name="tkllm", route_prefix="/", blocking=False)
    print(f"serving {cfg.model} with the deltas of {cfg.deltas} at http://{cfg.host}:{cfg.port}/v1 "
          "(Ctrl-C stops)", flush=True)
    import signal
    import time

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # a service manager's stop: shut Serve down as Ctrl-C does
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


COMMANDS = {"ingest": cmd_ingest, "finetune": cmd_finetune, "merge": cmd_merge, "synth": cmd_synth,
            "quickstart": cmd_quickstart, "tokenizer-train": cmd_tokenizer_train, "serve": cmd_serve,
            "experts": cmd_experts, **jobs_cmd.COMMANDS, **orchestrate_cmd.COMMANDS}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # report against the subcommand the user typed, not the top-level parser
        parser.subparsers[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return COMMANDS[args.command](args)
    except TkllmError as e:
        print(f"tkllm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a user error raised inside a Ray task arrives wrapped
        cause = _user_error(e)
        if cause is None:
            raise
        print(f"tkllm {args.command}: error: {cause}", file=sys.stderr)
        return 1


def _user_error(e: BaseException) -> TkllmError | None:
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, TkllmError):
            return e
        e = getattr(e, "cause", None) or e.__cause__
        seen += 1
    return None


if __name__ == "__main__":
    sys.exit(main())
