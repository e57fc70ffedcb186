"""``POST /criteria/judge`` without the web framework (its routing and dependency injection were
a fifth of the judge's CPU per verdict); the FastAPI route in ``views.py`` documents it. Both call
``service.judge_once``."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from services.common.auth import KeyRing, resolve_project
from services.common.errors import APIError, invalid_input
from services.common.http import bearer_header, loads_json, read_body, send_error
from services.judge.protocol import JudgeBody
from services.judge.service import judge_once


class JudgeEndpoint:
    """``POST /criteria/judge`` without the web framework (its routing and dependency injection
    were a fifth of the judge's CPU per verdict): auth, the JSON policy, validation, the envelope."""

    def __init__(self, *, keyring: KeyRing, service: Any) -> None:
        self.keyring = keyring
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            project_id = resolve_project(self.keyring, bearer_header(scope))
            payload = loads_json(await read_body(receive))
            try:
                body = JudgeBody.model_validate(payload)
            except ValidationError as exc:
                raise invalid_input(exc.errors()) from None
            out, timing = await judge_once(self.service, project_id, body)
        except APIError as exc:
            await send_error(send, exc)
            return
        raw = orjson.dumps(out.model_dump(exclude_none=True))
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(raw)).encode()),
            (b"server-timing", timing.encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": raw})
