"""Imported by Inspect through the ``inspect_ai`` entry point: registers Airlock's extensions.

Registers the ``airlock/<model>/<variant>`` model provider, the ``airlock-bwrap`` sandbox
environment and the built-in proxy suites as Inspect tasks.
"""

from __future__ import annotations

import contextlib

# Each import registers through Inspect's decorators; a missing optional piece must not break
# Inspect for the others, so the imports are independent.
with contextlib.suppress(ImportError):
    from airlock.evals import provider  # noqa: F401
with contextlib.suppress(ImportError):
    from airlock.evals import sandbox  # noqa: F401
with contextlib.suppress(ImportError):
    import importlib

    from airlock.evals.suites import SUITE_MODULES

    # Importing a suite module registers its @task, so `inspect eval airlock/<suite>` finds it.
    for _module in SUITE_MODULES.values():
        with contextlib.suppress(ImportError):
            importlib.import_module(_module)
