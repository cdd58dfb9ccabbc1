"""The hub round trip against a local stand-in of the hub (tests/hubserver.py: an HTTP server on 127.0.0.1 speaking the
hub API huggingface_hub uses), every client in a fresh process pointed at it with HF_ENDPOINT, nothing of ours mocked:

- a recipe with `model: base/tiny` downloads it from the stand-in; with HF_HUB_OFFLINE=1 the cached id is used (no
  request reaches the hub) and an id not in the cache is refused with a clear message;
- `llmcompress push` of the finished run uploads model + card + report.json/report.md/plots to a private repo; the
  repo downloaded back with snapshot_download loads in plain transformers with the local export's logits, and its
  card's metadata (base_model_relation, license, model-index) comes back through ModelCard.load;
- a push without a token, with a bad token, or to an unreachable endpoint exits 2 with a message and changes nothing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hubserver import TOKEN, HubStandIn

ROOT = Path(__file__).resolve().parents[2]
RTN = {"type": "quantize", "method": "rtn", "bits": 4, "group_size": 32}
EVAL = {"type": "evaluate", "limit": 10, "perplexity": {"max_tokens": 256, "ctx_len": 128, "stride": 64}}
CARD_OF_BASE = b"---\nlicense: apache-2.0\n---\n\n# base/tiny\n\nThe stand-in's copy of tiny-random-llama.\n"


def _env(hub_url: str, hf_home: Path, **extra: str) -> dict[str, str]:
    """A child's environment: the hub is the stand-in (online unless asked), its own HF cache, no token."""
    drop = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
            "TRANSFORMERS_CACHE", "HF_MODULES_CACHE", "HF_XET_CACHE", "HF_ASSETS_CACHE")  # HF_HOME rules below
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(HF_ENDPOINT=hub_url, HF_HOME=str(hf_home), HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmcompress.cli", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


def _recipe(path: Path, model: str, stages: list[dict]) -> Path:
    path.write_text(json.dumps({"name": path.stem, "model": model, "threads": 1, "stages": stages}))
    return path


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def hub(tiny_model_dir):
    files = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.is_file()}
    with HubStandIn() as server:
        server.add_repo("base/tiny", {**files, "README.md": CARD_OF_BASE})
        yield server


@pytest.fixture(scope="module")
def hub_run(hub, tmp_path_factory):
    """`model: base/tiny` quantized, exported and evaluated, the model downloaded from the stand-in."""
    root = tmp_path_factory.mktemp("hubrun")
    env = _env(hub.url, root / "hf")
    recipe = _recipe(root / "hubrun.json", "base/tiny",
                     [RTN, {"type": "export", "format": "compressed-tensors"}, EVAL])
    run = _cli(env, "run", str(recipe), "-o", str(root / "run"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Fetching 7 files" in run.stderr  # snapshot_download's own progress bar, shown during the run
    return root, env


def test_hub_id_downloads_through_hf_endpoint_then_offline_uses_the_cache(hub, hub_run):
    root, env = hub_run
    assert ("GET", "/base/tiny/resolve/" + hub.repos["base/tiny"].branches["main"] + "/model.safetensors") \
        in hub.requests
    snapshots = list((root / "hf" / "hub" / "models--base--tiny" / "snapshots").iterdir())
    assert len(snapshots) == 1 and (snapshots[0] / "model.safetensors").is_file()

    seen = len(hub.requests)
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    run = _cli(offline, "run", str(_recipe(root / "again.json", "base/tiny", [RTN])), "-o", str(root / "again"), "-q")
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(hub.requests) == seen  # the cache alone: nothing asked of the hub

    run = _cli(offline, "run", str(_recipe(root / "missing.json", "base/missing", [RTN])), "-o",
               str(root / "missing"), "-q")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "`base/missing` is a hub id, but HF_HUB_OFFLINE is set, and it is not in the local Hugging Face cache" \
        in run.stderr and "Fix:" in run.stderr
    assert len(hub.requests) == seen


def test_push_uploads_model_card_and_report_to_a_private_repo(hub, hub_run):
    root, env = hub_run
    before = _tree(root / "run")
    push = _cli(env, "push", str(root / "run"), "me/tiny-rtn", "--token", TOKEN)
    assert push.returncode == 0, push.stderr[-3000:]
    assert f"pushed to {hub.url}/me/tiny-rtn/commit/" in push.stdout
    repo = hub.repos["me/tiny-rtn"]
    assert repo.private  # private unless --public
    files = hub.files("me/tiny-rtn")
    export = root / "run" / "02-export" / "model"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "llmcompress.json"):
        assert files[name] == (export / name).read_bytes()
    for name in ("report.json", "report.md", "plots/tradeoff.png"):
        assert files[name] == (root / "run" / name).read_bytes()
    card = files["README.md"].decode()
    assert 'from_pretrained("me/tiny-rtn"' in card and str(export) not in card
    # weights are what the real hub would send by LFS (Xet); the stand-in takes every file in the commit
    assert hub.modes["model.safetensors"] == "lfs"
    assert _tree(root / "run") == before  # nothing local written

    head, commits = repo.branches["main"], len(repo.commits)
    again = _cli(env, "push", str(root / "run"), "me/tiny-rtn", "--token", TOKEN)  # unchanged: nothing new
    assert again.returncode == 0, again.stderr[-3000:]
    assert repo.branches["main"] == head and len(repo.commits) == commits


_ROUND_TRIP = """
import json, sys, torch
from huggingface_hub import HfApi, ModelCard, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
local, token = sys.argv[1], sys.argv[2]
try:
    HfApi().model_info("me/tiny-rtn")
    hidden = False
except RepositoryNotFoundError:
    hidden = True
folder = snapshot_download("me/tiny-rtn", token=token)
ids = torch.tensor([[5, 80, 17, 301, 42, 7, 99, 250]])
logits = [AutoModelForCausalLM.from_pretrained(f, dtype=torch.bfloat16).eval()(input_ids=ids).logits
          for f in (folder, local)]
card = ModelCard.load(folder + "/README.md").data
print(json.dumps({"hidden": hidden, "same": bool(torch.equal(*logits)), "card": card.to_dict(),
                  "evals": [[e.dataset_name, e.metric_type, e.metric_value] for e in card.eval_results or []],
                  "private": HfApi(token=token).model_info("me/tiny-rtn").private}))
"""


def test_pushed_repo_downloads_back_loads_in_transformers_and_keeps_its_card(hub, hub_run, tmp_path):
    root, env = hub_run
    if "me/tiny-rtn" not in hub.repos:
        assert _cli(env, "push", str(root / "run"), "me/tiny-rtn", "--token", TOKEN).returncode == 0
    export = root / "run" / "02-export" / "model"
    child = subprocess.run([sys.executable, "-c", _ROUND_TRIP, str(export), TOKEN], capture_output=True, text=True,
                           env=_env(hub.url, tmp_path / "hf"), timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    got = json.loads(child.stdout.strip().splitlines()[-1])
    assert got["hidden"] and got["private"]  # private: not visible without the token
    assert got["same"]  # the downloaded folder gives the local export's logits, bit for bit
    card = got["card"]
    assert card["base_model"] == "base/tiny" and card["base_model_relation"] == "quantized"
    assert card["license"] == "apache-2.0" and card["library_name"] == "transformers"
    assert {"llmcompress", "rtn"} <= set(card["tags"])
    assert card["model-index"][0]["name"] == "me/tiny-rtn"
    report = json.loads((root / "run" / "report.json").read_text())
    acc = report["models"]["compressed"]["eval"]["pydoc_cloze"]["acc"]
    assert ["pydoc_cloze", "acc", pytest.approx(acc)] in got["evals"]
    assert any(e[0] == "perplexity" and e[1] == "perplexity" for e in got["evals"])


def test_push_errors_exit_2_with_a_message_and_change_nothing(hub, hub_run, tiny_model_dir):
    root, env = hub_run
    before = _tree(root / "run")
    cases = [
        (env, "me/none", "no Hugging Face token"),
        (env, "me/bad", "the hub refused the token (HTTP 401)"),
        (_env(f"http://127.0.0.1:{_closed_port()}", root / "hf"), "me/nowhere", "cannot reach the hub"),
        ({**env, "HF_HUB_OFFLINE": "1"}, "me/offline", "HF_HUB_OFFLINE is set"),
        (env, "not a repo", "is not valid"),
    ]
    for case_env, repo_id, message in cases:
        token = [] if "none" in repo_id else ["--token", "wrong" if repo_id == "me/bad" else TOKEN]
        push = _cli(case_env, "push", str(root / "run"), repo_id, *token)
        assert push.returncode == 2, (repo_id, push.stdout, push.stderr[-2000:])
        assert message in push.stderr and "Fix:" in push.stderr and "Traceback" not in push.stderr, push.stderr
        assert repo_id not in hub.repos
    assert _tree(root / "run") == before

    # a plain model folder goes up as it is, to a new branch, public when asked
    push = _cli(env, "push", str(tiny_model_dir), "me/plain", "--public", "--revision", "dev", "--token", TOKEN)
    assert push.returncode == 0, push.stderr[-2000:]
    assert not hub.repos["me/plain"].private and set(hub.repos["me/plain"].branches) == {"main", "dev"}
    files = hub.files("me/plain", "dev")
    assert {n: files[n] for n in files if n != ".gitattributes"} == \
        {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.is_file()}


def test_export_stage_push_to_hub_runs_after_the_run_and_needs_a_token(hub, tmp_path):
    stages = [RTN, {"type": "export", "format": "compressed-tensors", "verify": False,
                    "push_to_hub": {"repo_id": "me/auto"}}]
    recipe = _recipe(tmp_path / "auto.json", "tiny-random-llama", stages)
    env = _env(hub.url, tmp_path / "hf")
    run = _cli(env, "run", str(recipe), "-o", str(tmp_path / "run"), "-q")
    assert run.returncode == 2 and "push_to_hub: me/auto" in run.stderr and "no Hugging Face token" in run.stderr
    assert not (tmp_path / "run" / "01-quantize").exists()  # refused before any weights loaded

    run = _cli({**env, "HF_TOKEN": TOKEN}, "run", str(recipe), "-o", str(tmp_path / "run"), "-q")
    assert run.returncode == 0, run.stderr[-3000:]
    files = hub.files("me/auto")
    assert hub.repos["me/auto"].private and {"README.md", "report.json", "report.md", "model.safetensors"} <= set(files)
    assert "base_model" not in files["README.md"].decode().split("---")[1]  # a builtin test model: no hub id


def test_hub_reachable_honours_hf_endpoint_and_proxies(hub, monkeypatch):
    from huggingface_hub import constants

    from llmcompress.utils import net

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    net._connects.cache_clear()
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    assert net.hub_reachable()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert not net.hub_reachable()
    # behind a proxy only the proxy must answer (the hub itself may not be reachable directly)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setenv("HTTPS_PROXY", hub.url)
    assert net.hub_reachable()
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{_closed_port()}")
    assert not net.hub_reachable()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not net.hub_reachable()
    net._connects.cache_clear()


@pytest.mark.parametrize("stages, relation", [
    ([{"type": "quantize"}], "quantized"),
    ([{"type": "quantize"}, {"type": "lora", "data": {"merge": "requantize"}}], "finetune"),
    ([{"type": "lora", "data": {"merge": "keep"}}], "adapter"),
    ([{"type": "prune"}], None),
])
def test_base_model_relation_says_what_the_run_did(stages, relation):
    from llmcompress.export.card import base_model_relation

    assert base_model_relation({"stages": stages}) == relation


def test_docstring_samples_load(tiny_model_dir):
    import re

    import yaml

    from llmcompress.export.hub import PushToHubConfig
    from llmcompress.export.stage import ExportStage
    from llmcompress.recipe import load_recipe

    export = yaml.safe_load(re.search(r"```yaml\n(.*?)```", ExportStage.__doc__, re.S)[1])
    recipe = load_recipe({"name": "x", "model": str(tiny_model_dir), "stages": [RTN, *export]})
    assert recipe.stages[1].push_to_hub is None
    push = yaml.safe_load(re.search(r"```yaml\n(.*?)```", PushToHubConfig.__doc__, re.S)[1])["push_to_hub"]
    assert PushToHubConfig(**push).private is True
