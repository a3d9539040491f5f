"""Prints the OpenAPI document of the app: ``make openapi`` writes openapi/openapi.json,
and tests/api/test_openapi.py fails when the committed file differs from the app."""

from __future__ import annotations

import json
import sys
from typing import Any

from agent.api.app import create_app
from agent.config import Settings
from agent.monitors.registry import MonitorRegistry


def openapi_document() -> dict[str, Any]:
    # The document depends on no host or token: build the app with none (creating it
    # probes nothing; the lifespan never runs here). Its components include the
    # schemas of the monitors in agent/monitors/ (a fresh registry: importing the
    # monitor modules does no BPF work).
    registry = MonitorRegistry()
    registry.discover()
    app = create_app(Settings(token=None, token_file=None), registry)
    doc: dict[str, Any] = json.loads(json.dumps(app.openapi()))
    return doc


def main() -> None:
    json.dump(openapi_document(), sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
