"""The running kernel's build configuration (CONFIG_*)."""

from __future__ import annotations

import gzip
import platform
import re
from pathlib import Path


def kernel_config() -> dict[str, str]:
    """CONFIG_* of the running kernel from /proc/config.gz or /boot/config-$(uname -r);
    empty when neither is readable."""
    text = ""
    try:
        text = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    except OSError:
        try:
            text = Path(f"/boot/config-{platform.release()}").read_text()
        except OSError:
            return {}
    return dict(re.findall(r"^(CONFIG_\w+)=(.*)$", text, re.MULTILINE))
