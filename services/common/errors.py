"""OpenAI-style errors: every failure leaves as ``{"message", "error": {message, type, param, code}}``.

The ``openpipe`` SDK reads the top-level ``message``; the ``openai`` SDK reads ``error``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm.exc import StaleDataError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error a client can act on. Raise it anywhere below a route."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(message: str, *, param: str | None = None) -> APIError:
    return APIError(404, message, type="not_found_error", param=param, code="not_found")


def unauthorized(message: str) -> APIError:
    return APIError(401, message, type="authentication_error", code="invalid_api_key")


def conflict(message: str, *, param: str | None = None) -> APIError:
    return APIError(409, message, param=param, code="conflict")


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="service_unavailable")


def error_body(status: int, message: str, *, type: str, param: str | None, code: str | None) -> dict:
    return {"message": message, "error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(exc: APIError) -> JSONResponse:
    body = error_body(exc.status_code, exc.message, type=exc.type, param=exc.param, code=exc.code)
    return JSONResponse(body, status_code=exc.status_code)


def _location(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def invalid_input(errors: list[dict], *, what: str = "Input") -> APIError:
    """A 400 naming up to five invalid fields, from pydantic's error list."""
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    param = _location(tuple(first.get("loc", ())))
    details = "; ".join(f"{_location(tuple(e.get('loc', ())))}: {e.get('msg')}" for e in errors[:5])
    return APIError(400, f"{what} validation failed: {details}", param=param, code="invalid_request")


def _validation_message(exc: RequestValidationError) -> tuple[str, str]:
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        reason = (errors[0].get("ctx") or {}).get("error", "malformed JSON")
        return f"Request body is not valid JSON: {reason} (at byte {errors[0]['loc'][-1]})", "body"
    error = invalid_input(errors)
    return error.message, error.param or "body"


def install_error_handlers(app: FastAPI) -> None:
    """The error envelope for every failure, one JSON policy for every body, and the OpenAPI
    document also under the API prefix (where SDK users look for it)."""
    from services.common.http import API_PREFIX, JsonBodies  # http builds on this module

    app.add_middleware(JsonBodies)
    _document_errors_and_auth(app)

    @app.get(API_PREFIX + "/openapi.json", include_in_schema=False)
    async def _openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(APIError(400, message, param=param, code="invalid_request"))

    @app.exception_handler(StaleDataError)
    async def _concurrent_change(_: Request, exc: StaleDataError) -> JSONResponse:
        # A row this request read was deleted or rewritten by another request before it wrote.
        return error_response(conflict("The resource was changed or deleted by a concurrent request; retry."))

    @app.exception_handler(DBAPIError)
    async def _database_error(_: Request, exc: DBAPIError) -> JSONResponse:
        sqlstate = str(getattr(exc.orig, "sqlstate", "") or "")
        if sqlstate.startswith("22"):  # a data exception: a value Postgres cannot store (a NUL character)
            return error_response(
                bad_request("A value in the request cannot be stored (NUL characters are not allowed).")
            )
        log.error("catalog database error", exc_info=exc)
        return error_response(APIError(500, "Internal error in the catalog database.", type="server_error"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), type=kind))


ERROR_SCHEMA = {
    "type": "object",
    "required": ["message", "error"],
    "properties": {
        "message": {"type": "string"},
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        },
    },
}
ERROR_RESPONSE = {
    "description": "The error envelope: a 400 names the invalid field in `error.param`",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def _document_errors_and_auth(app: FastAPI) -> None:
    """The OpenAPI says what the API does: project-key bearer auth, and every 4xx is the error
    envelope (FastAPI's default 422 ``HTTPValidationError`` is never sent: validation is a 400)."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {})
            components.setdefault("schemas", {})["Error"] = ERROR_SCHEMA
            for unused in ("HTTPValidationError", "ValidationError"):
                components["schemas"].pop(unused, None)
            components["securitySchemes"] = {
                "projectKey": {"type": "http", "scheme": "bearer", "description": "a project API key"}
            }
            schema["security"] = [{"projectKey": []}]
            for item in schema.get("paths", {}).values():
                for operation in item.values():
                    responses = operation.setdefault("responses", {})
                    responses.pop("422", None)
                    responses.setdefault("4XX", ERROR_RESPONSE)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
