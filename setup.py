"""The compiled extension (everything else is in pyproject.toml): the per-event path,
agent/monitors/fastpath.c, built with the system's gcc and Python headers when the
project is installed (nothing is downloaded). Without a compiler the build fails loudly;
the agent itself runs without the extension (agent/monitors/compiled.py: the Python
decoder takes over)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "agent.monitors._fastpath", ["agent/monitors/fastpath.c"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers",
                        "-Wno-cast-function-type"],
)])
