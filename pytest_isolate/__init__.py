"""pytest-isolate: run each test in an isolation tier and report escapes and overuse.

PYTEST_DONT_REWRITE: the fork server imports this package before its pytest session is
configured, so pytest could not rewrite it there and would say so with a
``PytestAssertRewriteWarning`` that a project's ``filterwarnings = error`` turns into a
dead worker. The plugin's own asserts need no rewriting.
"""

__version__ = "0.1.0"
