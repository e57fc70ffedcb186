"""Run the local model server alone: ``python -m services.serving [--port N] [--preload BASE ...]``.

It serves the OpenAI wire format on ``/v1`` for the base models of the model store and the LoRA
adapters of the blob store (``DISTILLERY_BLOB_URL``); ``distillery up`` starts it as a child
process. Settings: ``DISTILLERY_MODEL_SERVER_*`` (see ``services/common/settings.py``).
"""

from __future__ import annotations

import argparse
import logging

from services.serving.server import build_app, serve

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m services.serving", description=__doc__)
    parser.add_argument("--host", default=None, help="interface to bind (default: DISTILLERY_HTTP_HOST)")
    parser.add_argument("--port", type=int, default=None, help="default: DISTILLERY_MODEL_SERVER_PORT")
    parser.add_argument("--preload", action="append", default=None, help="a base model to load at start")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app, settings = build_app(preload=args.preload)
    serve(app, host=args.host or settings.http_host, port=args.port or settings.model_server_port)
