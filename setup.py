"""The compiled extensions (everything else is in pyproject.toml): the per-event path,
agent/monitors/fastpath.c, and the stream hub's ring store, agent/stream/ringstore.c, built with the system's gcc and Python headers when the
project is installed (nothing is downloaded). Without a compiler the build fails loudly;
the agent itself runs without them (agent/monitors/compiled.py and agent/stream/ring.py:
the Python decoder and ring store take over)."""

from setuptools import Extension, setup

FLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers",
         "-Wno-cast-function-type"]

setup(ext_modules=[
    Extension("agent.monitors._fastpath", ["agent/monitors/fastpath.c"],
              extra_compile_args=FLAGS),
    # The stream hub's ring store (agent/stream/ring.py: the Python one is the fallback).
    Extension("agent.stream._ringstore", ["agent/stream/ringstore.c"],
              extra_compile_args=FLAGS),
])
