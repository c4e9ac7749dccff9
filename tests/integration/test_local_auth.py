"""init_ray's private local instance runs with token authentication on, with the project's token (not ~/.ray)."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from hscr_platform.core.ray_local import auth_header

pytestmark = pytest.mark.integration


def test_local_instance_requires_the_projects_token_and_its_workers_have_it():
    import ray

    from hscr_platform.core.runtime import RayConfig, init_ray

    assert not ray.is_initialized()
    home_token = Path.home() / ".ray" / "auth_token"
    before = home_token.read_text() if home_token.exists() else None
    init_ray(RayConfig(num_cpus=1, object_store_mb=100, dashboard=True))
    try:
        token = os.environ["RAY_AUTH_TOKEN_PATH"]
        assert os.environ["RAY_AUTH_MODE"] == "token" and Path(token).stat().st_mode & 0o777 == 0o600

        @ray.remote(num_cpus=0.5)
        def worker_auth() -> tuple[str | None, str | None]:
            return os.environ.get("RAY_AUTH_MODE"), os.environ.get("RAY_AUTH_TOKEN_PATH")

        assert ray.get(worker_auth.remote()) == ("token", token)
        url = f"http://{ray.worker.get_dashboard_url()}/api/jobs/"
        assert _status(url) == 401
        with urllib.request.urlopen(urllib.request.Request(url, headers=auth_header(token)), timeout=30) as ok:
            assert ok.status == 200
    finally:
        ray.shutdown()
    after = home_token.read_text() if home_token.exists() else None
    assert after == before, "the shared ~/.ray/auth_token is neither written nor changed"


def _status(url: str, timeout_s: float = 90.0) -> int:
    """The HTTP status of a GET without a token, once the dashboard answers at all (it starts after ray.init)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
