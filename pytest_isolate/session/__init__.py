"""The sandbox's pytest session is the user's own session.

A sandbox runs its test in a separate pytest session (the fork server's, see
``forkserver.py``), made from the controller's command line, ini and plugins. What keeps
that session the user's lives here, one concern per module:

- ``node``: pytest-xdist's node protocol, spoken for real. The server is a worker whose
  ``workerinput`` the controller's plugins filled in ``pytest_configure_node``, and
  whose ``workeroutput`` reaches them in ``pytest_testnodedown``: pytest-cov,
  pytest-rerunfailures, pytest-randomly, syrupy and others rely on exactly that to work
  across processes, and it keeps plugins from writing their session-end files twice.
- ``carry``: state a plugin builds per test inside the sandbox (coverage data, ...),
  carried back to the controller after each test, since each test's process ends there.
- ``adapters``: plugins that act in the controller around a test (pytest-timeout's
  timer, pytest-rerunfailures' attempts) and must act on the sandbox instead.
- ``junit``: the controller's junit XML as the sandbox's fixtures see it: the same
  family (and warnings) for ``record_property`` and the like, what they record sent back.
"""
