"""RFC 9457 problem details: the one place engine and validation errors become HTTP."""

from __future__ import annotations

import errno as errno_module
import logging
import os
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.errors import KvmError

log = logging.getLogger("kvm_memattr.api")

PROBLEM_JSON = "application/problem+json"

ERRNO_STATUS = {
    "EINVAL": 422,
    "EBADF": 422,
    "EEXIST": 409,
    "EBUSY": 409,
    "ENOENT": 404,
    "ENOTTY": 400,
    "ENOMEM": 507,
    "ENOSPC": 507,
    "EOPNOTSUPP": 400,
    "EAGAIN": 409,
    "EFAULT": 422,
    "ENODEV": 400,
    "EFBIG": 422,
    "EOVERFLOW": 422,
    "EPERM": 403,
    "E2BIG": 413,
}
_HTTP_ERRNO = {401: "EPERM", 403: "EPERM", 404: "ENOENT", 405: "EINVAL", 413: "E2BIG"}


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """``application/problem+json`` (RFC 9457) with the kernel errno name."""

    type: str = Field(examples=["urn:kvm-memattr:errno:EINVAL"])
    title: str = Field(examples=["Invalid argument"])
    status: int = Field(examples=[422])
    detail: str = Field(examples=["address and size must be 4 KiB aligned"])
    errno: str = Field(examples=["EINVAL"])
    instance: str = Field(examples=["/v1/vms/1f0c.../memory-attributes"])
    errors: list[ValidationIssue] | None = None
    signal: str | None = Field(None, examples=["SIGBUS"], description="a host access: the signal it takes")
    fault_offset: int | None = Field(
        None, description="a host access: the offset in the mapping of the first page that takes the signal"
    )
    error_offset: int | None = Field(
        None,
        description="KVM_SET_MEMORY_ATTRIBUTES2's ENOMEM and EAGAIN: the byte offset in the file it stopped at "
        "(EAGAIN: the first page in use)",
    )


def errno_title(errno: str) -> str:
    """``strerror()`` of an errno name: the problem's title."""
    value = getattr(errno_module, errno, None)
    return os.strerror(value) if value is not None else errno


def problem_document(
    status: int, errno: str, detail: str, instance: str, errors: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The RFC 9457 members, with the kernel errno name and its strerror() as the title."""
    body: dict[str, Any] = {
        "type": f"urn:kvm-memattr:errno:{errno}",
        "title": errno_title(errno),
        "status": status,
        "detail": detail,
        "errno": errno,
        "instance": instance,
    }
    if errors is not None:
        body["errors"] = errors
    return body


def problem(
    request: Request, status: int, errno: str, detail: str, errors: list[dict[str, Any]] | None = None
) -> JSONResponse:
    body = problem_document(status, errno, detail, request.url.path, errors)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


def kvm_problem(request: Request, exc: KvmError) -> JSONResponse:
    """An engine error (errno-typed) as problem+json."""
    log.info("%s %s -> %s: %s", request.method, request.url.path, exc.errno, exc.detail)
    status = ERRNO_STATUS.get(exc.errno, 422)
    body = {**problem_document(status, exc.errno, exc.detail, request.url.path), **exc.members}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


def _issues(exc: RequestValidationError) -> list[dict[str, Any]]:
    # pydantic's ctx may hold exception objects: keep only what is JSON.
    out = []
    for e in exc.errors():
        issue = {
            "loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
            "msg": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        if issue["type"] == "json_invalid":  # say where and why, not "JSON decode error"
            at = issue["loc"][-1] if issue["loc"] else "?"
            issue["msg"] = (
                f"the body is not valid JSON: {(e.get('ctx') or {}).get('error', 'syntax error')} at character {at}"
            )
            issue["loc"] = ["body"]
        out.append(issue)
    return out


def _plain(issue: dict[str, Any], request: Request) -> str:
    """Say what is wrong with a body in words a user can act on."""
    kind, loc = issue["type"], issue["loc"]
    content_type = request.headers.get("content-type", "")
    if loc == ["body"] and kind in ("model_attributes_type", "dict_type", "model_type"):
        if "json" not in content_type:
            return f"send the body as JSON with Content-Type: application/json (got {content_type or 'none'})"
        return "the body must be a JSON object"
    return str(issue["msg"])


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into problem+json."""

    @app.exception_handler(KvmError)
    async def kvm_error(request: Request, exc: KvmError) -> JSONResponse:
        return kvm_problem(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        issues = _issues(exc)
        first = issues[0] if issues else {"loc": [], "msg": "invalid request", "type": ""}
        where = ".".join(str(p) for p in first["loc"])
        msg = _plain(first, request)
        log.info("%s %s -> EINVAL: %s", request.method, request.url.path, msg)
        return problem(request, 422, "EINVAL", f"{where}: {msg}" if where else msg, issues)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's 400 "error parsing the body" is a malformed body: the contract says 422 EINVAL.
        status = 422 if exc.status_code == 400 else exc.status_code
        errno = _HTTP_ERRNO.get(status, "EINVAL")
        detail = str(exc.detail)
        if status == 404 and request.url.path.endswith("/") and len(request.url.path) > 1:
            detail = f"no route {request.url.path}; paths have no trailing slash: {request.url.path.rstrip('/')}"
        response = problem(request, status, errno, detail)
        if exc.headers:
            response.headers.update(exc.headers)
        if status == 405:
            # Starlette names only the first matching route's methods; a path may have several routes.
            response.headers["Allow"] = ", ".join(sorted(_allowed_methods(request)))
        return response


def _allowed_methods(request: Request) -> set[str]:
    # Read from the OpenAPI paths rather than router internals, which differ across FastAPI versions.
    # As OpenAPI resolves paths, a concrete path (/v1/vms/import) wins over a template (/v1/vms/{vm_id}).
    paths = request.app.openapi().get("paths", {})
    if request.url.path in paths:
        return {m.upper() for m in paths[request.url.path]}
    methods: set[str] = set()
    for template, item in paths.items():
        if re.fullmatch(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)), request.url.path):
            methods |= {m.upper() for m in item}
    return methods


def error_responses(*errnos: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the errnos a route can return (always EINVAL for bad input)."""
    by_status: dict[int, list[str]] = {}
    for e in ("EINVAL", *errnos):
        status = ERRNO_STATUS[e]
        if e not in by_status.setdefault(status, []):
            by_status[status].append(e)
    return {
        status: {"model": Problem, "description": " or ".join(names)} for status, names in sorted(by_status.items())
    }
