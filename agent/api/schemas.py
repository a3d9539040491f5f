"""Each registered monitor's models as OpenAPI components: <Name>Options (the body of
POST /monitors/{name}/start), <Name>StatsQuery (the query of GET
/monitors/{name}/stats it takes) and <Name>Event (its events on /events and in JSONL).
The routes are generic over monitors, so these are components no path refers to."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from agent.monitors.registry import MonitorRegistry

REF = "#/components/schemas/{model}"


def component_name(monitor: str, kind: str) -> str:
    return "".join(part.title() for part in monitor.split("_")) + kind


def monitor_components(registry: MonitorRegistry) -> dict[str, dict[str, Any]]:
    """{component name: JSON Schema} for every monitor of ``registry``, with the models
    they refer to (pydantic's $defs) as components of their own."""
    out: dict[str, dict[str, Any]] = {}
    for cls in registry:
        models: dict[str, type[BaseModel]] = {
            "Options": cls.Options, "StatsQuery": cls.StatsQuery, "Event": cls.EventModel}
        for kind, model in models.items():
            schema = model.model_json_schema(ref_template=REF)
            out.update(schema.pop("$defs", {}))
            name = component_name(cls.name, kind)
            schema["title"] = name
            out[name] = schema
    return out


def add_monitor_components(app: FastAPI, registry: MonitorRegistry) -> None:
    """Extend the app's OpenAPI document with the components of ``registry``."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = generate()
            doc.setdefault("components", {}).setdefault("schemas", {}).update(
                monitor_components(registry))
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]
