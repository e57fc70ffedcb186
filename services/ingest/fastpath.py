"""``POST /report`` without the web framework: the highest-volume route, served straight from ASGI.

Same checks and answers as the FastAPI routes in ``views.py`` (auth, body limit, validation,
the error envelope; both call ``service.record_report``); it skips only routing, dependency
injection and response models, which cost more than the work itself at thousands of reports per
second (see bench/ingest.py).
"""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from services.common.auth import KeyRing, resolve_project
from services.common.errors import APIError
from services.common.http import bearer_header, read_body, send_bytes, send_error
from services.ingest.service import OK_BODY, IngestDeps, record_report


class ReportEndpoint:
    def __init__(self, route: str, *, keyring: KeyRing, deps: IngestDeps) -> None:
        self.route = route
        self.keyring = keyring
        self.deps = deps

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            project_id = resolve_project(self.keyring, bearer_header(scope))
            await record_report(self.deps, self.route, await read_body(receive), project_id)
        except APIError as exc:
            await send_error(send, exc)
            return
        await send_bytes(send, 200, OK_BODY)
