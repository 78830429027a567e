"""Request bodies the routes read by hand (streamed, size- and depth-limited through
``read_json``), described for OpenAPI: FastAPI cannot infer what it does not parse."""

from __future__ import annotations

from typing import Any

__all__ = ["FOLDER", "json_body"]

#: A scene folder of uploaded blobs, as ``POST /jobs`` and ``POST /scenes`` take it (the
#: bodies are read by hand, streamed and size-limited, so FastAPI cannot infer these).
FOLDER = {
    "main": {"type": "string", "description": "the .blend to open"},
    "files": {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["path", "sha256", "size"],
            "properties": {
                "path": {"type": "string"},
                "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "size": {"type": "integer", "minimum": 0},
            },
        },
    },
}


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI request body (required, JSON) of a route that reads its body by hand."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
