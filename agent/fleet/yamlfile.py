"""Reading the controller's YAML files (inventory, desired state) with errors that name the
file and what is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_yaml_mapping(path: Path, error: type[Exception], *, required: str,
                      required_type: type, hint: str, allowed: set[str]) -> dict[str, Any]:
    """The mapping in ``path`` (YAML or JSON), which must hold ``required`` as a
    ``required_type`` and no key beyond ``allowed``; raises ``error`` otherwise."""
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise error(f"{path}: nested too deep") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get(required), required_type):
        raise error(f"{path}: expected a mapping with {hint}")
    unknown = set(data) - allowed
    if unknown:
        raise error(f"{path}: unknown keys: {', '.join(sorted(unknown))}")
    return data
