"""The API documents, generated from the same request and response models the routes use.

- `/docs.json` (and `/openapi.json`): OpenAPI 3.1, whose schema objects are JSON Schema 2020-12,
  exactly what pydantic emits, so numeric bounds (`exclusiveMinimum: 0`) are valid as written.
  BentoML's Swagger UI at `/docs` reads it.
- `/schema.json`: the service schema BentoML's own clients (`bentoml.SyncHTTPClient`) read to
  learn each endpoint's name, route and body.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, TypeAdapter
from starlette.routing import BaseRoute, Mount, Route

VERSION = "0.1.0"
ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {"type": "string", "description": "what is wrong, naming the field"},
        "detail": {"type": "array", "items": {"type": "object"}},
    },
    "required": ["error"],
}
OPENAI_ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
            "required": ["message", "type"],
        }
    },
    "required": ["error"],
}


@dataclass(frozen=True)
class ApiDoc:
    name: str
    path: str
    request: type[BaseModel]
    response: Any


def _schema(annotation: Any, defs: dict[str, Any]) -> dict[str, Any]:
    schema = TypeAdapter(annotation).json_schema(ref_template="#/components/schemas/{model}")
    defs.update(schema.pop("$defs", {}))
    return schema


def openapi_document(docs: list[ApiDoc], routes: list[BaseRoute]) -> dict[str, Any]:
    defs: dict[str, Any] = {"Error": ERROR_SCHEMA, "OpenAIError": OPENAI_ERROR_SCHEMA}

    def error_for(path: str) -> dict[str, Any]:  # the OpenAI-compatible API answers in its shape
        ref = "OpenAIError" if path.startswith("/openai/") else "Error"
        return {
            "description": "a client or server error",
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
        }

    error = error_for("/")
    paths: dict[str, Any] = {}
    for doc in docs:
        paths[doc.path] = {
            "post": {
                "operationId": doc.name,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _schema(doc.request, defs)}},
                },
                "responses": {
                    "200": {
                        "description": "OK",
                        "content": {"application/json": {"schema": _schema(doc.response, defs)}},
                    },
                    "4XX": error,
                    "5XX": error,
                },
            }
        }
    for path, method in _plain_routes(routes):
        if path in paths and method in paths[path]:
            continue
        parameters = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in _path_params(path)
        ]
        operation: dict[str, Any] = {
            "operationId": f"{method}_{re.sub(r'[^A-Za-z0-9]+', '_', path).strip('_')}",
            "responses": {
                "200": {"description": "OK"},
                "4XX": error_for(path),
                "5XX": error_for(path),
            },
        }
        if parameters:
            operation["parameters"] = parameters
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "Tiffin", "version": VERSION},
        "paths": paths,
        "components": {"schemas": defs},
    }


def _plain_routes(routes: list[BaseRoute], prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for route in routes:
        if isinstance(route, Mount):
            out += _plain_routes(list(route.routes), prefix + route.path)
        elif isinstance(route, Route):
            path = prefix + route.path.replace(":path}", "}")
            for method in sorted(route.methods or ()):
                if method != "HEAD":
                    out.append((path, method.lower()))
    return out


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]


def bentoml_schema(docs: list[ApiDoc]) -> dict[str, Any]:
    return {
        "name": "tiffin",
        "type": "service",
        "routes": [
            {
                "name": doc.name,
                "route": doc.path,
                "batchable": False,
                "input": doc.request.model_json_schema(),
                "output": TypeAdapter(doc.response).json_schema(),
                "is_task": False,
            }
            for doc in docs
        ],
    }
