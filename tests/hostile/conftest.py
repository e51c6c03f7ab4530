"""The bad-input suite: hostile or careless inputs and faults, each with a bounded time and a clear outcome.

Every test in this folder carries the ``hostile`` marker (``python -m pytest -m hostile`` runs the suite alone); it
is part of the default run. Test files here are named ``test_hostile_*.py`` so that their module names do not
collide with the unit and integration tiers.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.hostile)
