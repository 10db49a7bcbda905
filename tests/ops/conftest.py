"""Fixtures shared by the ops tests."""

import pytest

from fastjepa.ops import reread_environment


class _Env:
    """``setenv``/``delenv`` of the backend variables, re-read at once (the package reads
    them once per process)."""

    def __init__(self, mp: pytest.MonkeyPatch):
        self.mp = mp

    def setenv(self, name: str, value: str) -> None:
        self.mp.setenv(name, value)
        reread_environment()

    def delenv(self, name: str) -> None:
        self.mp.delenv(name, raising=False)
        reread_environment()


@pytest.fixture
def env():
    """An environment for one test; the original is restored and re-read afterwards, so
    later tests never see a cached value of this one."""
    with pytest.MonkeyPatch.context() as mp:
        yield _Env(mp)
    reread_environment()
