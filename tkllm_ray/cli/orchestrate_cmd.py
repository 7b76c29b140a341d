"""`tkllm retrain` and `tkllm deltas`: scheduled retraining and the delta registry."""

from __future__ import annotations

import json

from tkllm_ray.config.storage import StorageOptions

STORE_HELP = "delta store root (path or s3://; S3 endpoint and keys from AWS_* variables)"


def add_parsers(sub) -> None:
    p = sub.add_parser("retrain", help="retrain the accounts whose posts changed (one tick, or --every 1d)",
                       description="One schedule tick: accounts with new or deleted posts since their delta's "
                                   "data watermark are re-ingested, fine-tuned packed and published as new "
                                   "versions; older versions beyond keep_versions are removed. Idempotent per tick.")
    p.add_argument("--config", required=True, metavar="FILE", help="YAML file with RetrainConfig fields")
    p.add_argument("--every", metavar="INTERVAL", help="keep running: one tick per interval (e.g. 1d, 6h)")
    p.add_argument("--tick", metavar="TICK", help="run this tick (YYYYMMDDTHHMMSSZ), e.g. to resume a crashed one")
    p.add_argument("--json", action="store_true", help="print the tick's report as JSON")

    p = sub.add_parser("deltas", help="list, show, roll back or garbage-collect published delta versions",
                       description="The delta registry over a store: versions, base fingerprint, metrics, data "
                                   "watermark; rollback points an account's LATEST at an older version (served "
                                   "replicas pick it up without a restart); gc removes old versions.")
    p.add_argument("action", choices=("list", "show", "rollback", "gc"), metavar="ACTION",
                   help="list [ACCOUNT] | show ACCOUNT [VERSION] | rollback ACCOUNT [VERSION] | gc --keep N")
    p.add_argument("account", nargs="?", metavar="ACCOUNT")
    p.add_argument("version", nargs="?", metavar="VERSION")
    p.add_argument("--store", required=True, metavar="URI", help=STORE_HELP)
    p.add_argument("--keep", type=int, default=3, help="gc: versions kept per account (default: 3)")
    p.add_argument("--dry-run", action="store_true", help="gc: only say what would be removed")
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_retrain(args) -> int:
    from tkllm_ray.config.base import load_config
    from tkllm_ray.config.retrain import RetrainConfig
    from tkllm_ray.orchestrate.retrain import run_every, run_retrain

    over = {k: v for k, v in (("every", args.every), ("tick", args.tick)) if v}
    cfg = load_config(RetrainConfig, args.config, over)
    if args.every:
        run_every(cfg)
        return 0
    report = run_retrain(cfg)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def cmd_deltas(args) -> int:
    from tkllm_ray.errors import TkllmError
    from tkllm_ray.orchestrate import registry

    opts = StorageOptions()
    if args.action in ("show", "rollback") and not args.account:
        raise TkllmError(f"deltas {args.action} needs an ACCOUNT")
    if args.action == "list":
        names = [args.account] if args.account else registry.accounts(args.store, opts)
        rows = [v.row() for a in names for v in (registry.versions(args.store, a, opts) if args.account
                                                  else [registry.show(args.store, a, None, opts)])]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(f"{'account':<24} {'version':<24} {'latest':<6} {'method':<6} {'entries':>10} {'ppl after':>9}  "
                  "watermark")
            for r in rows:
                ppl = f"{r['eval_ppl_after']:.2f}" if r["eval_ppl_after"] is not None else "-"
                print(f"{r['account']:<24} {r['version']:<24} {'*' if r['latest'] else '':<6} {r['method'] or '-':<6} "
                      f"{r['entries'] or 0:>10,} {ppl:>9}  {r['data_watermark'] or '-'}")
    elif args.action == "show":
        v = registry.show(args.store, args.account, args.version, opts)
        print(json.dumps({**v.row(), "manifest": v.manifest}, indent=2))
    elif args.action == "rollback":
        old, new = registry.rollback(args.store, args.account, args.version, opts)
        print(f"{args.account}: LATEST {old} -> {new}")
    else:
        gone = registry.gc(args.store, args.keep, [args.account] if args.account else None, args.dry_run, opts)
        verb = "would remove" if args.dry_run else "removed"
        for account, names in gone.items():
            if names:
                print(f"{account}: {verb} {len(names)} version(s): {', '.join(names)}")
        print(f"{verb} {sum(map(len, gone.values()))} version(s) over {len(gone)} account(s)")
    return 0


COMMANDS = {"retrain": cmd_retrain, "deltas": cmd_deltas}
