"""hscr_platform.core.runtime.use_local_token: a private local Ray instance gets token auth with the project's token."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hscr_platform.core.runtime import use_local_token

AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@pytest.fixture
def clean_auth_env(monkeypatch):
    for name in AUTH_VARS:
        monkeypatch.delenv(name, raising=False)


def test_a_fresh_owner_only_token_is_written_and_named(clean_auth_env):
    token = use_local_token()
    assert token is not None and token.is_file()
    assert os.environ["RAY_AUTH_MODE"] == "token" and os.environ["RAY_AUTH_TOKEN_PATH"] == str(token)
    assert token.stat().st_mode & 0o777 == 0o600 and token.parent.stat().st_mode & 0o777 == 0o700
    assert len(token.read_text()) == 64
    assert Path.home() / ".ray" not in token.parents, "never the shared ~/.ray/auth_token"
    assert use_local_token() is None and os.environ["RAY_AUTH_TOKEN_PATH"] == str(token), "same token again"


def test_a_token_the_user_gave_is_used_not_replaced(clean_auth_env, monkeypatch, tmp_path):
    given = tmp_path / "mine"
    given.write_text("x" * 64)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(given))
    assert use_local_token() is None
    assert os.environ["RAY_AUTH_MODE"] == "token" and os.environ["RAY_AUTH_TOKEN_PATH"] == str(given)


def test_mode_token_without_a_token_gets_the_projects_token(clean_auth_env, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    token = use_local_token()
    assert token is not None and os.environ["RAY_AUTH_TOKEN_PATH"] == str(token)
