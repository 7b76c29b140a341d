"""`tkllm submit` against a real Ray head (dashboard + job server) started from this venv's `ray`:
the ingest job, then the packed fine-tune job on its dataset, both uploaded as a working dir; a
job that fails on the cluster comes back as a clear error with its log tail."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import ray.job_submission  # noqa: F401  (imported before capsys swaps stderr: Ray's log handlers keep the stream)
import yaml

from tkllm_ray import jobs
from tkllm_ray.cli.main import main
from tkllm_ray.data.synth import generate_records, write_jsonl
from tkllm_ray.errors import TkllmError
from tkllm_ray.sparse.delta_store import load_delta
from tkllm_ray.storage import resolve_latest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
# the working dir is a copy of the repository (the job configs must live inside it, and the test
# must not write into the checkout); what the copy leaves out, DEFAULT_EXCLUDES would leave out too
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "runs", "results", "__pycache__", "*.egg-info", ".pytest_cache",
                                     ".carry", ".whl", "build", "dist")
PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port",
              "--node-manager-port", "--object-manager-port")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop this head only. `ray stop` would kill every Ray process of the machine (it matches process
    names), so: SIGTERM to `ray start --block` (it tears down the processes it started), then SIGKILL to
    whatever is left in its process group or still names this head's temp dir."""
    import psutil

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in psutil.process_iter(["cmdline"]):
        args = p.info["cmdline"] or ()
        if p.pid != os.getpid() and any(a.endswith(temp_dir) or temp_dir + os.sep in a for a in args):
            try:
                p.kill()
            except psutil.Error:
                pass
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_head():
    bindir = Path(sys.executable).parent
    temp_dir = tempfile.mkdtemp(prefix="tkjob", dir="/tmp")  # short: Ray's socket paths live under it
    ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS))))
    env = {"PATH": f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin",  # the job's `python` is this venv's
           "HOME": os.path.join(temp_dir, "home"), "LANG": "C.UTF-8", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    cmd = [str(bindir / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--num-cpus", "2", "--include-dashboard", "true", "--temp-dir", temp_dir]
    cmd += [str(a) for flag, port in ports.items() for a in (flag, port)]
    log_path = os.path.join(temp_dir, "head.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the Ray head did not come up:\n" + Path(log_path).read_text()[-3000:])
                time.sleep(0.5)
        yield url
    finally:
        _stop_head(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("jobs") / "repo"
    shutil.copytree(ROOT, wd, ignore=COPY_IGNORE)
    (wd / "job-configs").mkdir()
    return wd


def _write_config(wd: Path, name: str, data: dict) -> str:
    (wd / "job-configs" / name).write_text(yaml.safe_dump(data))
    return f"job-configs/{name}"


def test_ingest_then_packed_finetune_as_ray_jobs(ray_head, workdir, tmp_path, capsys):
    raw = tmp_path / "raw"
    records = generate_records(n_accounts=2, posts_per_account=30, seed=5)
    write_jsonl(records, str(raw / "posts.jsonl"))
    accounts = sorted({r["authorMeta"]["name"] for r in records})
    dataset, deltas = tmp_path / "dataset", tmp_path / "deltas"

    ingest = _write_config(workdir, "ingest.yaml", {
        "inputs": [str(raw)], "output": str(dataset), "render": {"enabled": False}, "shuffle_partitions": 1})
    ingest_id = jobs.submit("ingest", ingest, ray_head, working_dir=workdir, wait=True, timeout_s=240,
                            submission_id="tkllm-test-ingest")
    assert ingest_id == "tkllm-test-ingest"
    assert jobs.status(ingest_id, ray_head) == "SUCCEEDED"
    assert (Path(resolve_latest(str(dataset))) / "_COMPLETE").exists()  # published
    assert "ingest summary" in jobs.logs(ingest_id, ray_head)

    finetune = _write_config(workdir, "finetune.yaml", {
        "accounts": "all", "data": str(dataset), "output": str(deltas), "model": "tkllm-tiny", "epochs": 1,
        "workers": 1, "seq_len": 32, "batch_size": 4, "warmup_steps": 1, "reselect_every": 0, "density": 0.01,
        "max_rows": 16, "checkpoint_every": 0})
    followed = io.StringIO()
    ft_id = jobs.submit("finetune", finetune, ray_head, working_dir=workdir, follow_logs=True, timeout_s=240,
                        env_vars={"TKLLM_TEST_MARK": "1"}, out=followed)
    assert "accounts on 1 worker(s)" in followed.getvalue()  # the job's summary, streamed while it ran
    for acct in accounts:  # one published delta per account, from this run
        delta, manifest = load_delta(str(deltas), acct)
        assert delta and manifest["account_id"] == acct

    details = {j.submission_id: j for j in jobs.list_jobs(ray_head)}
    assert details[ft_id].metadata["tkllm_pipeline"] == "finetune"
    assert details[ft_id].runtime_env["env_vars"] == {"TKLLM_TEST_MARK": "1"}
    assert main(["jobs", "list", "--address", ray_head]) == 0
    listed = capsys.readouterr().out
    assert ingest_id in listed and ft_id in listed and "SUCCEEDED" in listed
    assert main(["jobs", "status", ft_id, "--address", ray_head]) == 0
    assert capsys.readouterr().out.strip() == "SUCCEEDED"


def test_a_job_failing_on_the_cluster_raises_with_its_log_tail(ray_head, workdir, tmp_path):
    # valid config (checked at submit), but the dataset is absent: the job itself fails
    bad = _write_config(workdir, "missing-data.yaml", {"accounts": "all", "data": str(tmp_path / "nope")})
    with pytest.raises(TkllmError) as e:
        jobs.submit("finetune", bad, ray_head, working_dir=workdir, wait=True, timeout_s=120)
    msg = str(e.value)
    assert " FAILED" in msg and "last lines of its log" in msg
    assert "tkllm finetune: error:" in msg  # the pipeline's own one-line error, from the cluster
