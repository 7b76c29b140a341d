"""Run the pipelines on a Ray cluster through the Ray Jobs API (`tkllm submit`, `tkllm jobs ...`).

A job is `python -m pipelines.<pipeline> --config <file>` run in the cluster with the local working
directory uploaded as its `working_dir`. The config is validated here, against its pydantic model,
before anything is uploaded: a typo fails at submit time, not minutes later on the cluster."""

from __future__ import annotations

import asyncio
import importlib
import os
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, TextIO

from tkllm_ray.config.base import load_config
from tkllm_ray.errors import TkllmError

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

PIPELINES = ("ingest", "finetune", "retrain")

# pipeline -> "module:ConfigClass" (imported lazily: retrain's config may be absent from a checkout)
CONFIG_MODELS = {
    "ingest": "tkllm_ray.config.ingest:IngestConfig",
    "finetune": "tkllm_ray.config.finetune:FinetuneConfig",
    "retrain": "tkllm_ray.config.retrain:RetrainConfig",
}

# gitignore-style patterns kept out of the uploaded working_dir (Ray also honours .gitignore)
DEFAULT_EXCLUDES = (
    "/.git", "/.venv", "/venv", "/runs", "/benchmarks/results", "/build", "/dist", "/.carry", "/.whl",
    "/.pytest_cache", "__pycache__", "*.pyc", "*.egg-info",
)

LOG_TAIL_LINES = 40
POLL_S = 1.0


def _check_pipeline(pipeline: str) -> None:
    if pipeline not in PIPELINES:
        raise TkllmError(f"unknown pipeline {pipeline!r}: known pipelines are {', '.join(PIPELINES)}")


def _relative_config(config_path: str | os.PathLike, working_dir: str | os.PathLike) -> str:
    """The config's path relative to `working_dir` (the job's cwd on the cluster), checked to exist."""
    wd = Path(working_dir).resolve()
    p = Path(config_path)
    full = (p if p.is_absolute() else wd / p).resolve()
    if not full.is_file():
        raise TkllmError(f"config file not found: {config_path} (looked for {full}; a relative path is taken "
                         f"from the working dir {wd})")
    try:
        rel = full.relative_to(wd)
    except ValueError:
        raise TkllmError(f"config file {full} is outside the working dir {wd}: only the working dir is uploaded, "
                         "so move the config under it (or pass --working-dir)") from None
    return rel.as_posix()


def entrypoint(pipeline: str, config_path: str | os.PathLike, working_dir: str | os.PathLike = ".") -> str:
    """The shell command the job runs: `python -m pipelines.<pipeline> --config <path relative to working_dir>`."""
    _check_pipeline(pipeline)
    rel = _relative_config(config_path, working_dir)
    return f"python -m pipelines.{pipeline} --config {shlex.quote(rel)}"


def config_model(pipeline: str) -> type:
    _check_pipeline(pipeline)
    module, name = CONFIG_MODELS[pipeline].split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise TkllmError(f"the {pipeline} pipeline's config model {CONFIG_MODELS[pipeline]} is not available "
                         f"in this installation ({e})") from None


def validate_config(pipeline: str, config_path: str | os.PathLike, working_dir: str | os.PathLike = "."):
    """Load the config with its pipeline's model (TkllmError naming the bad field otherwise)."""
    p = Path(config_path)
    return load_config(config_model(pipeline), p if p.is_absolute() else Path(working_dir) / p)


def runtime_env(working_dir: str | os.PathLike = ".", env_vars: dict[str, str] | None = None,
                pip: list[str] | None = None, excludes: tuple[str, ...] | list[str] = DEFAULT_EXCLUDES) -> dict:
    env: dict = {"working_dir": str(Path(working_dir).resolve()), "excludes": list(excludes)}
    if env_vars:
        env["env_vars"] = {str(k): str(v) for k, v in env_vars.items()}
    if pip:
        env["pip"] = list(pip)
    return env


def resolve_address(address: str | None) -> str:
    """The given address, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS (Ray's own order)."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise TkllmError("no Ray cluster address: pass --address http://HEAD:8265 (the dashboard) or set RAY_ADDRESS")
    return address


@contextmanager
def _explicit_address() -> Iterator[None]:
    # The SDK lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address it is given; ours wins.
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


AUTH_HINT = ("the cluster wants a token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or put the token in "
             "~/.ray/auth_token)")


def client(address: str | None) -> JobSubmissionClient:
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    try:
        with _explicit_address():
            return JobSubmissionClient(url)
    except AuthenticationError:
        raise TkllmError(f"the Ray job server at {url} refused the request: {AUTH_HINT}") from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise TkllmError(f"cannot reach the Ray job server at {url}: {e}") from None


@contextmanager
def _job_errors(job_id: str | None, url: str) -> Iterator[None]:
    from ray.exceptions import AuthenticationError

    what = f"job {job_id}" if job_id else "the job server"
    try:
        yield
    except AuthenticationError:
        raise TkllmError(f"{what} at {url}: {AUTH_HINT}") from None
    except RuntimeError as e:  # the SDK's answer to an unknown job or a failed request
        raise TkllmError(f"{what} at {url}: {e}") from None
    except OSError as e:  # requests' and aiohttp's connection errors: the head went away
        raise TkllmError(f"lost the Ray job server at {url} ({what}): {e}") from None


def submit(pipeline: str, config: str | os.PathLike, address: str | None = None, working_dir: str | os.PathLike = ".",
           submission_id: str | None = None, env_vars: dict[str, str] | None = None, pip: list[str] | None = None,
           excludes: tuple[str, ...] | list[str] = DEFAULT_EXCLUDES, wait: bool = False, follow_logs: bool = False,
           timeout_s: float | None = None, out: TextIO | None = None) -> str:
    """Validate the config, upload `working_dir`, start the job; returns its submission id. With
    `follow_logs` the job's output streams to `out` (stdout) until it ends; with `wait` or
    `follow_logs`, a job that does not succeed raises TkllmError (with the tail of its log)."""
    command = entrypoint(pipeline, config, working_dir)
    if not (Path(working_dir) / "pipelines" / f"{pipeline}.py").is_file():
        raise TkllmError(f"pipelines/{pipeline}.py is not under the working dir {Path(working_dir).resolve()}: "
                         "submit from the repository root (or pass --working-dir)")
    rel = _relative_config(config, working_dir)
    validate_config(pipeline, rel, working_dir)
    c = client(address)
    env = runtime_env(working_dir, env_vars, pip, excludes)
    with _job_errors(submission_id, c.get_address()):
        try:
            job_id = c.submit_job(entrypoint=command, runtime_env=env, submission_id=submission_id,
                                  metadata={"tkllm_pipeline": pipeline, "tkllm_config": rel})
        except ValueError as e:  # e.g. the working dir is larger than the upload limit
            raise TkllmError(f"cannot submit {pipeline}: {e}") from None
    if follow_logs:
        follow(job_id, address, out=out)
    if wait or follow_logs:
        wait_for(job_id, address, timeout_s)
    return job_id


def status(job_id: str, address: str | None = None) -> JobStatus:
    c = client(address)
    with _job_errors(job_id, c.get_address()):
        return c.get_job_status(job_id)


def logs(job_id: str, address: str | None = None) -> str:
    c = client(address)
    with _job_errors(job_id, c.get_address()):
        return c.get_job_logs(job_id)


def stop(job_id: str, address: str | None = None) -> bool:
    """Ask the job to stop; False if it had already ended."""
    c = client(address)
    with _job_errors(job_id, c.get_address()):
        return c.stop_job(job_id)


def list_jobs(address: str | None = None) -> list[JobDetails]:
    c = client(address)
    with _job_errors(None, c.get_address()):
        return c.list_jobs()


def follow(job_id: str, address: str | None = None, out: TextIO | None = None) -> None:
    """Stream the job's output to `out` (stdout) until the job ends."""
    c = client(address)
    out = out or sys.stdout

    async def pump() -> None:
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    with _job_errors(job_id, c.get_address()):
        asyncio.run(pump())


def log_tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def wait_for(job_id: str, address: str | None = None, timeout_s: float | None = None) -> JobStatus:
    """Poll until the job ends. Returns SUCCEEDED; FAILED or STOPPED raise TkllmError with the log tail;
    so does a timeout (the job keeps running: `tkllm jobs stop` ends it)."""
    from ray.job_submission import JobStatus

    c = client(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with _job_errors(job_id, c.get_address()):
        while True:
            st = c.get_job_status(job_id)
            if st.is_terminal():
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TkllmError(f"job {job_id} is still {st} after {timeout_s:g} s (it keeps running; "
                                 f"stop it with `tkllm jobs stop {job_id}`)")
            time.sleep(POLL_S)
        if st == JobStatus.SUCCEEDED:
            return st
        info = c.get_job_info(job_id)
        tail = log_tail(c.get_job_logs(job_id))
    # Ray's message may carry a copy of the whole log after its first line: keep the first line only
    first = (info.message or "").strip().split("\n", 1)[0].split(", last available logs")[0]
    reason = f" ({first})" if first else ""
    raise TkllmError(f"job {job_id} {st}{reason}; last lines of its log:\n{tail}")


# the public name; submit() calls it wait_for because its own `wait` flag shadows it there
wait = wait_for
