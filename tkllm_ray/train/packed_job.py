"""`tkllm finetune --accounts ...`: many accounts' GSPF fine-tunes packed onto Ray Train workers.

Each worker loads the base once and runs the packed engine (train/packed.py) over its share of the
accounts (account i goes to worker i mod N: a restarted worker finds the same share). Per-account
checkpoints and results live under the run directory (local or s3://); a worker group that Ray
Train restarts after a failure (FailureConfig) skips the accounts this run already published
(recovering their result records), discards versions it left half-published, and resumes the
in-flight accounts from their checkpoints: every account ends with exactly one delta of the run.
With `zero3` the workers shard the frozen base (DeepSpeed ZeRO-3, train/zero3.py) and run in lockstep.
"""

from __future__ import annotations

import json
import os
import time

import torch

from tkllm_ray.config.finetune import FinetuneConfig
from tkllm_ray.errors import TkllmError
from tkllm_ray.storage import (
    exists,
    filesystem_for,
    join,
    list_files,
    new_version_id,
    read_latest,
    read_text,
    write_text,
)

# Fault injection for the kill-a-worker test: the first worker to reach this many steps exits hard
# (once per run: a marker in the run directory), as a lost node would.
FAULT_ENV = "TKLLM_FAULT_AFTER_STEPS"


def resolve_accounts(cfg: FinetuneConfig) -> list[str]:
    from tkllm_ray.train.data import list_accounts

    if cfg.accounts == "all":
        found = list_accounts(cfg.data, cfg.storage)
    else:
        found = [line.strip() for line in read_text(cfg.accounts, cfg.storage).splitlines() if line.strip()]
    if not found:
        raise TkllmError(f"no accounts to fine-tune ({cfg.accounts}; dataset {cfg.data})")
    return found


def run_packed_finetune(cfg: FinetuneConfig, progress: bool = True) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from tkllm_ray.data.ingest import ensure_ray

    accounts = resolve_accounts(cfg)
    run_id = cfg.run_id or new_version_id()
    run_dir = cfg.run_dir or join(cfg.output, "_runs", run_id)
    ensure_ray()
    fs, ray_path = filesystem_for(join(run_dir, "ray"), cfg.storage)
    use_gpu = cfg.gpus_per_worker > 0
    env = {FAULT_ENV: os.environ[FAULT_ENV]} if FAULT_ENV in os.environ else {}
    trainer = TorchTrainer(
        _worker, train_loop_config={"cfg": cfg.model_dump(), "accounts": accounts, "run_id": run_id,
                                    "run_dir": run_dir},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=use_gpu,
            resources_per_worker={"GPU": cfg.gpus_per_worker} if use_gpu else {"CPU": 1}),
        run_config=ray.train.RunConfig(
            name=run_id, storage_path=ray_path, storage_filesystem=fs, worker_runtime_env={"env_vars": env},
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)))
    t0 = time.time()
    _fit_with_progress(trainer, join(run_dir, "results"), len(accounts), cfg, progress)
    wall = time.time() - t0
    results = [json.loads(read_text(u, cfg.storage)) for u in list_files(join(run_dir, "results"), cfg.storage)]
    missing = sorted(set(accounts) - {r["account"] for r in results})
    if missing:
        raise TkllmError(f"{len(missing)} accounts did not finish (e.g. {missing[:3]}); see {run_dir}")
    tokens = sum(r["train_tokens"] for r in results)
    return {"run_id": run_id, "run_dir": run_dir, "accounts": len(results), "workers": cfg.workers,
            "wall_s": wall, "accounts_per_hour": 3600 * len(results) / wall, "train_tokens_per_s": tokens / wall,
            "per_account": sorted(results, key=lambda r: r["account"])}


def _fit_with_progress(trainer, results: str, total: int, cfg: FinetuneConfig, progress: bool) -> None:
    """trainer.fit() with a bar of accounts published (the workers write one result file each)."""
    import threading

    from tqdm import tqdm

    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=_capture(trainer.fit)), daemon=True)
    thread.start()
    with tqdm(total=total, desc="accounts", unit="acct", disable=not progress) as bar:
        while thread.is_alive():
            thread.join(timeout=2.0)
            done = len(list_files(results, cfg.storage)) if exists(results, cfg.storage) else 0
            bar.update(done - bar.n)
    if isinstance(box.get("result"), BaseException):
        raise box["result"]


def _capture(fn):
    try:
        return fn()
    except BaseException as e:  # re-raised on the driver's thread
        return e


def _worker(config: dict) -> None:
    """One Ray Train worker: the base once, the engine over this worker's share of the accounts."""
    import ray.train
    from ray.train.torch import get_device

    from tkllm_ray.data.tokenizer import load_tokenizer
    from tkllm_ray.models import fingerprint
    from tkllm_ray.models.load import load_base_model, resolve_dtype
    from tkllm_ray.sparse.sensitivity import target_linears
    from tkllm_ray.train.packed import PackedGSPF, UserCheckpoints
    from tkllm_ray.train.single import AccountRun, publish_run
    from tkllm_ray.train.zero3 import Lockstep, fingerprint_sharded, load_sharded_base, weight_shape

    cfg = FinetuneConfig.model_validate(config["cfg"])
    run_id, run_dir = config["run_id"], config["run_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device() if cfg.gpus_per_worker > 0 else torch.device("cpu")
    tok = load_tokenizer(cfg.tokenizer, cfg.storage)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.zero3:
        model = load_sharded_base(cfg.model, len(tok), cfg.seed, dtype, device, cfg.storage, cfg.tokenizer)
        base_fp = fingerprint_sharded(model)
    else:
        model = load_base_model(cfg.model, len(tok), cfg.seed, device, cfg.storage, cfg.tokenizer, dtype)
        base_fp = fingerprint(model)
    shapes = {n: weight_shape(m.weight) for n, m in target_linears(model, cfg.target_modules).items()}
    if cfg.method != "gspf":
        return _ts_worker(cfg, config, model, tok, base_fp, shapes, device, rank, world)
    checkpoints = UserCheckpoints(join(run_dir, "users"), cfg.checkpoint_every, cfg.storage, run_id)
    marks = json.loads(read_text(cfg.watermarks, cfg.storage)) if cfg.watermarks else {}
    mine = _still_to_train(cfg, config["accounts"][rank::world], run_id, run_dir)
    budget = int(cfg.state_memory_gb * 2**30) if cfg.state_memory_gb else None
    host = int(cfg.host_state_memory_gb * 2**30) if cfg.host_state_memory_gb else None
    engine = PackedGSPF(model, cfg.target_modules, cfg.max_resident, cfg.max_rows, checkpoints, budget, host,
                        lockstep=Lockstep(device) if cfg.zero3 else None)
    engine.on_step = _fault_injector(run_dir, cfg)

    def done(user, delta) -> None:
        acfg, t = user.job.cfg, time.time()
        result = {"account": user.account, "method": "gspf", "device": str(device), "worker": rank,
                  "eval_ppl_before": user.ppl["before"], "eval_ppl_after": user.ppl["after"], "zero3": cfg.zero3,
                  "train_loss_last": user.losses[-1], "steps": len(user.losses), "trainable_params": user.state.k,
                  "loss_curve": [round(x, 4) for x in user.losses],
                  "train_tokens": int((user.labels != -100).sum()) * acfg.epochs, "reselection": user.state.history}
        out = publish_run(acfg, AccountRun(result, None, base_fp, shapes, delta), run_id=run_id,
                          data_watermark=marks.get(user.account))
        out["publish_s"] = time.time() - t
        write_text(join(run_dir, "results", f"{user.account}.json"), json.dumps(out, default=str), cfg.storage)

    t0 = time.time()
    stats = engine.run(_account_jobs(cfg, mine), tok.eos_token_id, done, evaluate=True)
    ray.train.report({"worker": rank, "accounts_done": len(mine), "wall_s": time.time() - t0, **stats})


def _account_jobs(cfg: FinetuneConfig, accounts: list[str]):
    """One AccountJob per account, its posts read when the engine admits it."""
    from tkllm_ray.train.data import account_posts
    from tkllm_ray.train.packed import AccountJob

    for account in accounts:
        acfg = cfg.model_copy(update={"account": account, "accounts": None})
        yield AccountJob(acfg, account_posts(cfg.data, account, "train", cfg.storage),
                         account_posts(cfg.data, account, "eval", cfg.storage))


def _ts_worker(cfg: FinetuneConfig, config: dict, model, tok, base_fp: str, shapes: dict, device, rank: int,
               world: int) -> None:
    """A worker's share of a packed token-selective run (train/packed_ts.py). Accounts this run
    published before a restart are skipped (as in GSPF runs); the others start over (their
    adapters are small: no per-account checkpoints)."""
    import ray.train

    from tkllm_ray.train.packed_ts import PackedTS
    from tkllm_ray.train.single import AccountRun, publish_run

    run_dir = config["run_dir"]
    mine = _still_to_train(cfg, config["accounts"][rank::world], config["run_id"], run_dir)
    marks = json.loads(read_text(cfg.watermarks, cfg.storage)) if cfg.watermarks else {}
    engine = PackedTS(model, cfg.method, cfg.target_modules, cfg.max_resident, cfg.max_rows)
    engine.on_step = _fault_injector(run_dir, cfg)

    def done(acct, result, modules, trainer) -> None:
        t = time.time()
        out = publish_run(acct.job.cfg, AccountRun({**result, "worker": rank}, None, base_fp, shapes, None, None,
                                                   trainer), run_id=config["run_id"],
                          data_watermark=marks.get(acct.account))
        out["publish_s"] = time.time() - t
        write_text(join(run_dir, "results", f"{acct.account}.json"), json.dumps(out, default=str), cfg.storage)

    t0 = time.time()
    stats = engine.run(_account_jobs(cfg, mine), tok.eos_token_id, done)
    ray.train.report({"worker": rank, "accounts_done": len(mine), "wall_s": time.time() - t0, **stats})


def _still_to_train(cfg: FinetuneConfig, accounts: list[str], run_id: str, run_dir: str) -> list[str]:
    """The accounts this run has not published yet. One it published before a restart keeps its
    version (its result file rebuilt if the worker died between the two); a version it left
    half-written is removed. So each account ends with exactly one version from the run."""
    from tkllm_ray.sparse.delta_store import discard_unpublished, published_by

    todo = []
    for account in accounts:
        if published_by(cfg.output, account, run_id, cfg.storage):
            _recover_result(cfg, account, run_dir)  # died after publishing, before writing the result
        else:
            discard_unpublished(cfg.output, account, run_id, cfg.storage)  # died mid-publish
            todo.append(account)
    return todo


def _recover_result(cfg: FinetuneConfig, account: str, run_dir: str) -> None:
    """An account this run published has its result file, rebuilt from the manifest if need be."""
    from tkllm_ray.sparse.delta_store import read_manifest

    uri = join(run_dir, "results", f"{account}.json")
    if exists(uri, cfg.storage):
        return
    version = read_latest(join(cfg.output, account), cfg.storage)
    manifest = read_manifest(cfg.output, account, version, cfg.storage)
    uri_key = "model_uri" if manifest.get("artifact") == "ts-adapters" else "delta_uri"
    result = {"account": account, "method": manifest.get("trained_as") or manifest["method"], **manifest["metrics"],
              "version": version, uri_key: join(cfg.output, account, version)}
    write_text(uri, json.dumps(result, default=str), cfg.storage)


def _fault_injector(run_dir: str, cfg: FinetuneConfig):
    after = int(os.environ.get(FAULT_ENV, "0"))
    marker = join(run_dir, "fault-injected")
    if not after or exists(marker, cfg.storage):
        return None

    def hook(engine, picked) -> None:
        if engine.stats["train_steps"] >= after and not exists(marker, cfg.storage):
            write_text(marker, "1", cfg.storage)
            os._exit(1)  # a hard loss: no exception handling, no cleanup

    return hook
