"""The embedded stores of ``distillery up``: SeaweedFS (S3) and the Tansu broker on it.

``Embedded.begin`` starts them in a helper thread so that the platform's imports overlap
their start-up; ``wait`` returns once both serve and points the settings at them. Each child
is supervised (restarted if it dies) and dies with this process. The ports in use are written
to ``<data_dir>/run.json`` while the platform runs (``read_run_file`` for tools).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from services.common.children import free_ports, port_open
from services.common.embedded_s3 import EmbeddedS3
from services.common.kafka import MEMORY_STORAGE, TansuBroker
from services.common.settings import Settings

RUN_FILE = "run.json"
_LAST_PORTS = "ports.json"


class Embedded:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        external_kafka = bool(os.environ.get("DISTILLERY_KAFKA_URL"))
        external_blobs = bool(os.environ.get("DISTILLERY_BLOB_URL") or settings.blob_url)
        self.durable = settings.embedded_kafka_storage == "s3"
        self.want_kafka = not external_kafka
        self.s3_blobs = settings.embedded_blob_store == "s3" and not external_blobs
        needs_s3 = (self.want_kafka and self.durable) or self.s3_blobs
        self.s3 = EmbeddedS3(settings.data_dir / "s3") if needs_s3 else None
        self.tansu: TansuBroker | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def begin(self) -> None:
        self._thread = threading.Thread(target=self._start, name="embedded-start", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        # Each child is spawned by its own long-lived supervisor thread, not by this one.
        try:
            if self.s3:
                self.s3.start()
            if self.want_kafka:
                try:
                    self._start_broker(self._kafka_port())
                except RuntimeError:  # last run's port was taken meanwhile: any free one
                    self._start_broker(free_ports(1)[0])
        except BaseException as exc:
            self._error = exc

    def _start_broker(self, port: int) -> None:
        log_path = self.settings.data_dir / "tansu.log"
        if self.durable and self.s3:
            self.tansu = TansuBroker.on_s3(self.s3, port, log_path)
        else:
            self.tansu = TansuBroker(port, log_path, storage=MEMORY_STORAGE)
        self.tansu.start()

    def _kafka_port(self) -> int:
        """The port of the last run when free (clients keep working across restarts), else any."""
        try:
            last = json.loads((self.settings.data_dir / _LAST_PORTS).read_text())["kafka"]
            if isinstance(last, int) and not port_open(last):
                return last
        except (OSError, ValueError, KeyError):
            pass
        return free_ports(1)[0]

    def wait(self) -> None:
        """Until both serve; then the settings point at them. Raises what start-up raised."""
        if self._thread:
            self._thread.join()
        if self._error is not None:
            self.stop()
            raise RuntimeError(f"embedded stores did not start: {self._error}") from self._error
        if self.tansu:
            self.settings.kafka_url = self.tansu.url
            (self.settings.data_dir / _LAST_PORTS).write_text(json.dumps({"kafka": self.tansu.port}))
        if self.s3 and self.s3_blobs:
            self.settings.blob_url = self.s3.url("blobs")

    def describe(self) -> str:
        parts = [f"Kafka {self.settings.kafka_url}"]
        if self.tansu:
            parts[0] += " (durable, on S3)" if self.durable else " (in memory: lost on stop)"
        if self.s3:
            parts.append(f"S3 {self.s3.endpoint}")
        return " · ".join(parts)

    def write_run_file(self, http_port: int, grpc_port: int) -> Path:
        info = {
            "pid": os.getpid(),
            "kafka_url": self.settings.kafka_url,
            "kafka_storage": "s3" if self.durable else "memory",
            "http_port": http_port,
            "grpc_port": grpc_port,
            "s3_endpoint": self.s3.endpoint if self.s3 else None,
            "broker_pid": self.tansu.pid if self.tansu else None,
            "s3_pid": self.s3.pid if self.s3 else None,
        }
        path = self.settings.data_dir / RUN_FILE
        path.write_text(json.dumps(info))
        return path

    def stop(self) -> None:
        """The broker first (its storage must outlive it), then S3."""
        if self.tansu:
            self.tansu.stop()
        if self.s3:
            self.s3.stop()


def read_run_file(data_dir: Path) -> dict | None:
    """What a running ``distillery up`` on ``data_dir`` recorded: ports, pids, storage."""
    try:
        return json.loads((data_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
