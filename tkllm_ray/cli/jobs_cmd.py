"""`tkllm submit` and `tkllm jobs`: the pipelines as Ray jobs on a cluster (tkllm_ray.jobs)."""

from __future__ import annotations

from datetime import datetime, timezone

from tkllm_ray.errors import TkllmError

ADDRESS_HELP = "Ray dashboard address, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)"


def add_parsers(sub) -> None:
    from tkllm_ray.jobs import PIPELINES

    p = sub.add_parser("submit", help="run a pipeline as a Ray job on a cluster (uploads the working dir)",
                       description="Validate the pipeline's config here, upload the working directory and start "
                                   "`python -m pipelines.PIPELINE --config FILE` as a Ray job. Prints the "
                                   "submission id.")
    p.add_argument("pipeline", choices=PIPELINES, metavar="PIPELINE", help=f"one of: {', '.join(PIPELINES)}")
    p.add_argument("--config", required=True, metavar="FILE",
                   help="the pipeline's YAML config, inside the working dir (relative paths start there)")
    p.add_argument("--address", metavar="URL", help=ADDRESS_HELP)
    p.add_argument("--working-dir", default=".", metavar="DIR",
                   help="directory uploaded as the job's working dir: the repository root (default: .)")
    p.add_argument("--submission-id", metavar="ID", help="job id to use (default: one Ray makes up)")
    p.add_argument("--env", nargs="+", action="extend", default=[], metavar="K=V",
                   help="environment variables of the job (repeatable)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end; exit 1 unless it succeeded")
    p.add_argument("--follow", action="store_true", help="stream the job's output until it ends (implies --wait)")
    p.add_argument("--timeout", type=float, metavar="S", help="with --wait: give up waiting after S seconds")

    p = sub.add_parser("jobs", help="status, logs, stop or list of Ray jobs on a cluster",
                       description="Look after jobs started with `tkllm submit` (or any Ray job).")
    p.add_argument("action", choices=("status", "logs", "stop", "list"), metavar="ACTION",
                   help="status|logs|stop JOB_ID, or list")
    p.add_argument("job_id", nargs="?", metavar="JOB_ID", help="the submission id `tkllm submit` printed")
    p.add_argument("--address", metavar="URL", help=ADDRESS_HELP)
    p.add_argument("--follow", action="store_true", help="logs: stream until the job ends")


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TkllmError(f"--env wants KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def cmd_submit(args) -> int:
    from tkllm_ray import jobs

    job_id = jobs.submit(args.pipeline, args.config, args.address, working_dir=args.working_dir,
                         submission_id=args.submission_id, env_vars=parse_env(args.env))
    print(job_id, flush=True)
    if args.follow:
        jobs.follow(job_id, args.address)
    if args.wait or args.follow:
        print(f"{job_id} {jobs.wait(job_id, args.address, args.timeout)}")
    return 0


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def cmd_jobs(args) -> int:
    from tkllm_ray import jobs

    if args.action == "list":
        for j in sorted(jobs.list_jobs(args.address), key=lambda j: j.start_time or 0):
            print(f"{j.submission_id or j.job_id}  {j.status!s:<9}  {_when(j.start_time)}  {j.entrypoint}")
        return 0
    if not args.job_id:
        raise TkllmError(f"jobs {args.action} needs a JOB_ID (see `tkllm jobs list`)")
    if args.action == "status":
        print(jobs.status(args.job_id, args.address))
    elif args.action == "logs":
        if args.follow:
            jobs.follow(args.job_id, args.address)
        else:
            print(jobs.logs(args.job_id, args.address), end="")
    else:
        stopped = jobs.stop(args.job_id, args.address)
        print(f"{args.job_id}: " + ("stop requested" if stopped else "not running (nothing to stop)"))
    return 0


COMMANDS = {"submit": cmd_submit, "jobs": cmd_jobs}
