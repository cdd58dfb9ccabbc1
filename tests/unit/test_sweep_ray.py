"""The ray executor on a local cluster the sweep starts (2 CPUs, a small object store) and stops, with tiny models:
the same leaderboard as the local executor, retries for crashes, none for bad input, nothing lost."""

from __future__ import annotations

import pytest

from llmcompress.errors import RecipeError
from llmcompress.sweep.config import RayExecutorConfig
from llmcompress.sweep.ray_executor import RayExecutor
from llmcompress.sweep.runner import run_sweep

from test_sweep import corrupt_model, own_cache, write_sweep  # noqa: F401 - own_cache is a fixture


def test_ray_sweep_matches_the_local_leaderboard_and_keeps_every_failure(tmp_path, own_cache, tiny_model_dir):  # noqa: F811
    import ray

    bad = corrupt_model(tmp_path, tiny_model_dir)
    path = write_sweep(
        tmp_path, grid={"stages.0.bits": [4, 8]},
        list=[{"name": "crashes", "model": str(bad)},
              {"name": "missing-data", "stages.0": {"type": "lora", "objective": "distill", "steps": 1,
                                                    "data": {"source": "bad-data.txt", "skip_tokens": 0}}}],
        executor={"type": "ray", "num_cpus": 1, "retries": 1, "local_cpus": 2, "object_store_mib": 80},
        recommend=[{"pick": "smallest", "min_quality_recovery": 0.9}])
    local = run_sweep(path, tmp_path / "local", executor="local", show_progress=False)
    remote = run_sweep(path, tmp_path / "ray", show_progress=False)
    assert not ray.is_initialized()  # the cluster the sweep started is gone

    assert remote["executor"]["type"] == "ray" and remote["executor"]["cluster"]["cpus"] == 2
    by = {o["name"]: o for o in remote["outcomes"]}
    assert {n: o["status"] for n, o in by.items()} == {"bits4": "done", "bits8": "done", "crashes": "failed",
                                                       "missing-data": "failed"}
    assert by["crashes"]["attempts"] == 2 and by["crashes"]["error_kind"] == "runtime"
    assert by["missing-data"]["attempts"] == 1 and by["missing-data"]["error_kind"] == "input"
    assert (tmp_path / "ray" / "runs" / "bits4" / "logs" / "sweep.log").is_file()  # the run's console, unattended
    # The same leaderboard: quality figures identical, the same pick; the original's evaluation came from the cache
    # the local run filled (Ray workers on this machine share it).
    key = ("name", "status", "size_bytes", "quality", "quality_recovery", "kl_mean", "top1_agreement")
    assert [tuple(r.get(k) for k in key) for r in remote["rows"]] == [tuple(r.get(k) for k in key)
                                                                      for r in local["rows"]]
    assert remote["recommendations"][0]["pick"] == local["recommendations"][0]["pick"] == "bits4"
    assert remote["baseline"] == {"runs": 2, "computed": 0, "reused": 2}
    assert (tmp_path / "ray" / "leaderboard.md").is_file() and (tmp_path / "ray" / "pareto.png").is_file()


class _FakeRay:
    def __init__(self, nodes):
        self._nodes = nodes

    def nodes(self):
        return [{"Alive": True, "Resources": r} for r in self._nodes]


def test_a_request_no_node_can_meet_is_an_error_not_a_wait():
    ex = RayExecutor(RayExecutorConfig(num_gpus=1, memory_gib=4), console=None)
    with pytest.raises(RecipeError) as e:
        ex._check_fits(_FakeRay([{"CPU": 16, "memory": 64 * 2**30}, {"CPU": 2, "GPU": 1, "memory": 2 * 2**30}]))
    assert "no node of the cluster has that" in str(e.value) and "Fix: lower" in str(e.value)
    ex._check_fits(_FakeRay([{"CPU": 8, "GPU": 2, "memory": 32 * 2**30}]))  # fits: no error


def test_joining_a_cluster_sends_the_token_ray_start_set_up(tmp_path, monkeypatch):
    """Ray 2.60: a driver joining a `ray start` cluster needs RAY_AUTH_MODE=token even with ~/.ray/auth_token
    (checked by hand against `ray start --head` on loopback, by GCS address and ray://: docs/notes/issue8-sweeps.md)."""
    import os

    from llmcompress.sweep.ray_executor import _token_auth_for

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "auth_token"))
    remote = RayExecutorConfig(address="ray://head:10001")
    assert not _token_auth_for(remote) and "RAY_AUTH_MODE" not in os.environ  # no token at hand: nothing to send
    (tmp_path / "auth_token").write_text("x" * 64)
    assert not _token_auth_for(RayExecutorConfig())  # a local cluster sets itself up
    assert _token_auth_for(remote) and os.environ["RAY_AUTH_MODE"] == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert not _token_auth_for(remote) and os.environ["RAY_AUTH_MODE"] == "disabled"  # the user's choice stands
