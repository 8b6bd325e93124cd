"""pipelines.ray_env's port choice for a local cluster's dashboard (no cluster started here)."""

from __future__ import annotations

import socket

import pytest

from pipelines import ray_env


@pytest.mark.parametrize("value, port", [("8265", 8265), ("0", 0), ("50123", 50123)])
def test_dashboard_port_from_the_environment(monkeypatch, value, port):
    monkeypatch.setenv(ray_env.DASHBOARD_PORT_ENV, value)
    assert ray_env._dashboard_port() == port


@pytest.mark.parametrize("value", ["http", "-1", "70000", ""])
def test_a_bad_dashboard_port_is_one_line_naming_it(monkeypatch, value):
    monkeypatch.setenv(ray_env.DASHBOARD_PORT_ENV, value)
    with pytest.raises(ValueError, match=rf"AVGK_DASHBOARD_PORT='{value}' must be a port number \(0: any free port\)"):
        ray_env._dashboard_port()


def test_a_taken_or_zero_preferred_port_gives_another_free_one():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        other = ray_env.free_port(busy)
        assert other not in (busy, 0)
    assert ray_env.free_port(0) != 0
