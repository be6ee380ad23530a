"""Fixtures of the apixo client tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from apixo_helpers import API_KEY, BASE_URL, Script, Sleeps, Step

from hailuo_batch.apixo import ApixoClient, RetryPolicy


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def make_client(sleeps: Sleeps) -> Iterator[Callable[..., tuple[ApixoClient, Script]]]:
    clients: list[ApixoClient] = []

    def make(*steps: Step, default: Step | None = None, **kw: Any) -> tuple[ApixoClient, Script]:
        script = Script(*steps, default=default)
        kw.setdefault("retry", RetryPolicy(max_attempts=4, max_elapsed_s=60, base_s=0.5, max_s=4))
        client = ApixoClient(
            API_KEY, BASE_URL, transport=httpx.MockTransport(script), sleep=sleeps, **kw
        )
        clients.append(client)
        return client, script

    yield make
    for c in clients:
        c.close()
