"""Platform wiring: ``distillery up`` runs the local model server as a supervised child process
(``python -m services.serving``), so generation never competes with the platform's event loop and a
crash of the model server does not take the platform down (it is restarted).

Skipped when ``model_server_url`` points at a server run elsewhere, or ``model_server_embedded`` is
false. The child gets the platform's blob store and model store, and ``model_server_url`` is set to
where it listens, so the router and the deployer find it.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import TYPE_CHECKING

from services.common.children import Supervised, clean_env, free_ports, port_open, spawn

if TYPE_CHECKING:
    from services.platform import Platform

log = logging.getLogger(__name__)


def _port(preferred: int) -> int:
    return preferred if not port_open(preferred) else free_ports(1)[0]


async def setup(platform: Platform) -> None:
    settings = platform.settings
    if settings.model_server_url or not settings.model_server_embedded:
        return
    port = _port(settings.model_server_port)
    settings.model_server_url = f"http://127.0.0.1:{port}"
    store = getattr(settings, "resolved_model_store_dir", None)
    env = {
        "DISTILLERY_DATA_DIR": str(settings.data_dir.resolve()),
        "DISTILLERY_MODEL_SERVER_PORT": str(port),
        "DISTILLERY_MODEL_SERVER_EMBEDDED": "false",
        "DISTILLERY_MODEL_SERVER_MAX_BATCH": str(settings.model_server_max_batch),
        "DISTILLERY_MODEL_SERVER_MAX_ADAPTERS": str(settings.model_server_max_adapters),
        "DISTILLERY_MODEL_SERVER_PRELOAD": settings.model_server_preload,
        "DISTILLERY_MODEL_SERVER_DEVICE": settings.model_server_device,
        "HF_HUB_OFFLINE": "1",
    }
    if store is not None:
        env["DISTILLERY_MODEL_STORE_DIR"] = str(store())
    log_path = settings.data_dir / "model-server.log"

    def launch() -> subprocess.Popen:
        # The blob URL is read at launch: the embedded S3 may only have chosen its port by then.
        child_env = clean_env({**env, "DISTILLERY_BLOB_URL": settings.resolved_blob_url()})
        command = [sys.executable, "-m", "services.serving", "--host", "127.0.0.1", "--port", str(port)]
        # Not waited for: it imports torch and loads bases in the background; callers retry.
        return spawn(command, log_path=log_path, env=child_env)

    child = Supervised("model server", launch)
    platform.state["model_server"] = child

    async def start() -> None:
        child.start()
        log.info("model server starting on %s (log: %s)", settings.model_server_url, log_path)

    async def stop() -> None:
        child.stop()

    platform.on_started.append(start)
    platform.on_stop.append(stop)
