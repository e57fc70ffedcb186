"""The training process: ``python -m services.trainer.run JOB_FOLDER`` (a child of the trainer, or a pod).

Reads ``request.json`` from the folder and runs it (``services.trainer.job.Run``); settings (blob
store URL, model cache) come from the environment, never the command line, which ``ps`` shows.
Exits 0 whenever the run reported an outcome (including failed, paused, cancelled). It holds an
exclusive lock on the folder for its lifetime, so two processes never train one job at once, and
it dies with the service that started it (Linux parent-death signal).
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import signal
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    parent = os.environ.get("DISTILLERY_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the parent died before the signal was armed
        os._exit(1)


def main(folder: Path) -> int:
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from services.common.blobstore import blob_store_from_url
    from services.common.events import TrainingRequest
    from services.common.settings import Settings
    from services.trainer.job import REQUEST_FILE, Run

    settings = Settings()
    request = TrainingRequest.model_validate_json((folder / REQUEST_FILE).read_bytes())
    with open(folder / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits out an earlier process of the same job
        run = Run(
            request,
            folder,
            blobs=blob_store_from_url(settings.resolved_blob_url()),
            store_dir=settings.resolved_model_store_dir(),
            max_steps=settings.trainer_max_steps,
        )
        status = run.execute()
    logging.getLogger(__name__).info("training job %s ended: %s", request.job_id, status)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m services.trainer.run JOB_FOLDER", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(Path(sys.argv[1]).resolve()))
