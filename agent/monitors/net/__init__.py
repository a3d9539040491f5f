"""The net monitor: net.c (kernel side) and monitor.py (Python side)."""

from . import monitor  # noqa: F401  (declares the monitor)
