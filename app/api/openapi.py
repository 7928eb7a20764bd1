"""The OpenAPI document: FastAPI's, then problem+json error responses with an example each, the
optional bearer scheme, links from creating calls to the calls on what they made, and exact
integer bounds."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.api import problems


def install_openapi(app: FastAPI, token: bool) -> None:
    """Build the document once, on first use, with the changes below. ``token``: whether the service
    asks for one (else Swagger UI shows no padlocks and no "Authorize")."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _problem_openapi(
                token,
                get_openapi(
                    title=app.title,
                    version=app.version,
                    description=app.description,
                    routes=app.routes,
                    tags=app.openapi_tags,
                ),
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _problem_openapi(token: bool, schema: dict[str, Any]) -> dict[str, Any]:
    """Error responses are problem+json; FastAPI's own 422 schema is replaced by Problem."""
    ref = {"$ref": "#/components/schemas/Problem"}
    for path, path_item in schema.get("paths", {}).items():
        for op in path_item.values():
            responses = op.get("responses", {})
            if any(p.get("in") in ("path", "query") for p in op.get("parameters", [])) or "requestBody" in op:
                responses.setdefault("422", {"description": "EINVAL"})
            if path.startswith("/v1/"):
                # Optional: a token is needed only when KVM_MEMATTR_API_TOKEN is set.
                if token:  # KVM_MEMATTR_API_TOKEN is set: a bearer token is needed
                    op["security"] = [{"bearer": []}]
                    responses.setdefault("401", {"description": "EPERM: missing token"})
                responses.setdefault(
                    "403",
                    {
                        "description": "EPERM: wrong token, a Host the service does not answer to, or "
                        "a state change sent by a page of another site"
                    },
                )
            if "{vm_id}" in path:
                responses.setdefault("404", {"description": "ENOENT"})
            if "requestBody" in op:
                responses.setdefault("413", {"description": "E2BIG: body larger than max_body_bytes"})
            for code, response in responses.items():
                if code.isdigit() and int(code) >= 400:
                    if response.get("description") == "Validation Error":
                        response["description"] = "EINVAL"
                    errno = response["description"].split(":")[0].split()[0]
                    example = {
                        "type": f"urn:kvm-memattr:errno:{errno}",
                        "title": problems.errno_title(errno),
                        "status": int(code),
                        "detail": "what the kernel rule refused",
                        "errno": errno,
                        "instance": path,
                    }
                    response["content"] = {problems.PROBLEM_JSON: {"schema": ref, "example": example}}
    if token:
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "KVM_MEMATTR_API_TOKEN"}
        }
    _add_links(schema)
    _exact_bounds(schema)
    components = schema["components"].setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema


# FastAPI's OpenAPI model types minimum/maximum as floats, so 2^64 - 1 came out as 1.8446744073709552e+19
# (which is 2^64). Our integer bounds are whole numbers; the two that floats cannot hold are restored.
_INEXACT = {float((1 << 64) - 1): (1 << 64) - 1, float((1 << 63) - 1): (1 << 63) - 1}


def _exact_bounds(node: Any) -> None:
    if isinstance(node, dict):
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            value = node.get(key)
            if isinstance(value, float) and value.is_integer():
                node[key] = _INEXACT.get(value, int(value))
        for child in node.values():
            _exact_bounds(child)
    elif isinstance(node, list):
        for child in node:
            _exact_bounds(child)


# OpenAPI links: what a creating call returns feeds the calls on the resource it made, so
# Swagger UI shows the way and stateful API fuzzers reach deep states.
_LINK_SOURCES = {
    ("/v1/vms", "post", "201"): {"vm_id": "$response.body#/id"},
    ("/v1/vms/{vm_id}/memslots/{slot}", "put", "200"): {"vm_id": "$request.path.vm_id", "slot": "$request.path.slot"},
    ("/v1/vms/{vm_id}/guest-memfds", "post", "201"): {"vm_id": "$request.path.vm_id", "fd": "$response.body#/fd"},
    ("/v1/vms/{vm_id}/mmu-notifier/invalidations", "post", "201"): {
        "vm_id": "$request.path.vm_id",
        "inv_id": "$response.body#/id",
    },
}


def _add_links(schema: dict[str, Any]) -> None:
    paths = schema.get("paths", {})
    for (path, method, status), provides in _LINK_SOURCES.items():
        links = {}
        for item in paths.values():
            for target in item.values():
                # A list, in the target's order: a set's order changes with the hash seed (and the document with it).
                names = [p["name"] for p in target.get("parameters", []) if p.get("in") == "path"]
                # Link when the source provides every path parameter beyond vm_id that the target needs.
                if names and set(names) <= provides.keys() and (set(names) - {"vm_id"} or path == "/v1/vms"):
                    params = {n: provides[n] for n in names}
                    links[target["operationId"]] = {"operationId": target["operationId"], "parameters": params}
        if links:
            paths[path][method]["responses"][status]["links"] = links
