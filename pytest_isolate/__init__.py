"""pytest-isolate: run each test in an isolation tier and report escapes and overuse."""

__version__ = "0.1.0"
