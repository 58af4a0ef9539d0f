"""Error responses: every client error is a 4xx whose body names the field at fault.

Validation errors (422) keep FastAPI's ``detail`` list and add to each entry ``field``, the
dotted location (``body.spec.train.schedule.iterations``), plus a one-line ``message``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


class ErrorPublic(BaseModel):
    detail: str


class FieldError(BaseModel):
    field: str
    msg: str
    type: str
    loc: list[str | int]


class ValidationErrorPublic(BaseModel):
    message: str
    detail: list[FieldError]


def dotted(loc: Sequence[str | int]) -> str:
    """``("body", "spec", "model", "min_size", "constrained-int")`` → ``body.spec.model.min_size``.

    Pydantic's union tags (``function-after[...]``, ``constrained-int``, ``int``...) are dropped.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or "-" in part or part in _TYPE_TAGS:
            continue
        else:
            out += f".{part}" if out else part
    return out


_TYPE_TAGS = {"int", "float", "str", "bool", "list", "tuple", "dict", "none", "nullable"}


def validation_error(loc: Sequence[str | int], msg: str, type_: str = "value_error") -> Any:
    """A RequestValidationError for one field, answered like pydantic's own."""
    return RequestValidationError([{"loc": tuple(loc), "msg": msg, "type": type_}])


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    entries = []
    for err in exc.errors():
        loc = [p if isinstance(p, int) else str(p) for p in err.get("loc", ())]
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        entries.append({"field": dotted(loc), "msg": msg, "type": err.get("type", ""), "loc": loc})
    message = "; ".join(f"{e['field']}: {e['msg']}" if e["field"] else e["msg"] for e in entries)
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content=jsonable_encoder({"message": message, "detail": entries}),
    )


async def _http_handler(request: Request, exc: Exception) -> Any:
    assert isinstance(exc, StarletteHTTPException)
    return await http_exception_handler(request, exc)


class BodyLimit:
    """413 (JSON, like every error) for bodies over ``max_bytes``: at once when Content-Length
    says so, else as soon as the streamed body passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> StarletteHTTPException:
        return StarletteHTTPException(
            413, detail=f"request body larger than {self.max_bytes} bytes (FGD_MAX_BODY_BYTES)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            exc = self._too_large()
            response = JSONResponse({"detail": exc.detail}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise self._too_large()  # inside the route: answered by the handler below
            return message

        await self.app(scope, limited, send)


async def _unexpected_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(status_code=500, content={"detail": "internal error (see server log)"})


def install(app: FastAPI, *, max_body_bytes: int) -> None:
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(Exception, _unexpected_handler)
