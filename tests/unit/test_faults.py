"""Faults a user meets: a run killed at any moment (SIGKILL, SIGTERM), artifacts deleted or damaged between runs, two
runs into one folder, a disk that fills up, a read-only or locked folder. Nothing finished may be lost, nothing broken
may be trusted, no process may outlive its run, and every failure ends with exit 2 and a message that says where.

Real processes (the CLI) on the tiny random llama; the kill times come from a seeded generator, so a failure is
reproducible from the seed in its message.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
SEED = 13


def recipe_file(tmp_path: Path, tiny_model_dir: Path, memory: bool = True) -> Path:
    """quantize (writes a model) -> evaluate (perplexity + KL, no lm-eval start-up) -> benchmark (a memory-probe child
    process when ``memory``): every kind of stage output, in ~20 s."""
    f = tmp_path / "faults.yaml"
    f.write_text(json.dumps({
        "name": "faults", "model": str(tiny_model_dir), "threads": 1, "dtype": "float32",
        "stages": [
            {"type": "quantize", "method": "rtn", "bits": 4, "group_size": 32},
            {"type": "evaluate", "tasks": [], "perplexity": {"max_tokens": 256, "ctx_len": 64, "stride": 64}},
            {"type": "benchmark", "batch_sizes": [1], "prompt_tokens": 8, "new_tokens": 4, "repeats": 1,
             "warmup": 0, "memory": memory},
        ]}))
    return f


def start(*args, env=None, cwd=ROOT) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "llmcompress.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)


def cli(*args, timeout=300, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    p = start(*args, env=env, cwd=cwd)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def descendants_of_run(run_dir: Path) -> list[psutil.Process]:
    """Live processes (other than pytest's) whose command line names the run folder: stage children, probes."""
    me = {os.getpid(), *[c.pid for c in psutil.Process().children(recursive=True)]}
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if str(run_dir) in cmd and p.pid not in me and p.status() != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


def assert_no_orphans(run_dir: Path, within_s: float = 10) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        left = descendants_of_run(run_dir)
        if not left:
            return
        time.sleep(0.2)
    raise AssertionError(f"processes outlived their run: {[' '.join(p.cmdline()) for p in left]}")


def quality(report: dict) -> dict:
    """What must not change between a clean run and a run that was killed and resumed: the quality figures."""
    ev = next(s for s in report["stages"] if s["type"] == "evaluate")["data"]
    return {"original": ev["original"]["perplexity"]["perplexity"],
            "compressed": ev["compressed"]["perplexity"]["perplexity"], "kl": ev["compressed"]["kl"]["kl_mean"],
            "size": report["models"]["compressed"]["size_bytes"]}


def test_a_run_killed_at_random_moments_resumes_to_the_same_report_with_no_process_left(tmp_path, tiny_model_dir):
    f = recipe_file(tmp_path, tiny_model_dir)
    clean = cli("run", f, "--output", tmp_path / "clean", "--quiet")
    assert clean.returncode == 0, clean.stderr[-3000:]
    expected = quality(json.loads((tmp_path / "clean" / "report.json").read_text()))

    rng = random.Random(SEED)
    run_dir = tmp_path / "killed"
    kills = []
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGTERM):
        p = start("run", f, "--output", run_dir, "--quiet")
        delay = rng.uniform(1.0, 14.0)
        try:
            p.wait(delay)
        except subprocess.TimeoutExpired:
            p.send_signal(sig)
        out, err = p.communicate(timeout=120)
        kills.append((sig.name, round(delay, 1), p.returncode))
        assert "Traceback" not in err, f"seed {SEED}, kills {kills}:\n{err[-3000:]}"
        assert_no_orphans(run_dir)
    done = cli("run", f, "--output", run_dir, "--quiet")
    assert done.returncode == 0, f"seed {SEED}, kills {kills}:\n{done.stderr[-3000:]}"
    report = json.loads((run_dir / "report.json").read_text())
    assert quality(report) == expected, kills
    assert_no_orphans(run_dir)
    # Nothing half-written is left beside the finished files.
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")], kills


def test_sigkill_during_the_memory_probe_takes_the_probe_with_it(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    p = start("run", recipe_file(tmp_path, tiny_model_dir), "--output", run_dir, "--quiet")
    probe = None
    deadline = time.monotonic() + 180
    while probe is None and time.monotonic() < deadline and p.poll() is None:
        for child in psutil.Process(p.pid).children(recursive=True):
            try:
                if "llmcompress.bench.memory" in " ".join(child.cmdline()):
                    probe = child
            except psutil.Error:
                pass
        time.sleep(0.05)
    assert probe is not None, "the benchmark's memory probe never started"
    p.kill()
    p.communicate(timeout=60)
    probe.wait(10)  # raises psutil.TimeoutExpired when the probe outlives its parent
    assert not probe.is_running()


def run_inproc(f: Path, run_dir: Path) -> dict:
    from llmcompress.pipeline import run_recipe

    return run_recipe(f, run_dir, show_progress=False)


def resumed(report: dict) -> list[bool]:
    return [s["resumed"] for s in report["stages"]]


DAMAGE = {
    "weights deleted": lambda d: (d / "01-quantize" / "model" / "model.safetensors").unlink(),
    "weights truncated": lambda d: os.truncate(d / "01-quantize" / "model" / "model.safetensors", 1000),
    "weights overwritten, same size": lambda d: _flip_bytes(d / "01-quantize" / "model" / "model.safetensors"),
    "model folder deleted": lambda d: shutil.rmtree(d / "01-quantize" / "model"),
    "config.json edited": lambda d: (d / "01-quantize" / "model" / "config.json").write_text("{}"),
    "result.json deleted": lambda d: (d / "01-quantize" / "result.json").unlink(),
    "result.json garbage": lambda d: (d / "01-quantize" / "result.json").write_bytes(b"\x00\xff garbage"),
    "result.json wrong shape": lambda d: (d / "01-quantize" / "result.json").write_text("[1, 2, 3]"),
    "result.json result of the wrong shape": lambda d: _edit_json(d / "01-quantize" / "result.json",
                                                                  lambda j: {**j, "result": {"type": 5}}),
    "outputs record garbage": lambda d: _edit_json(d / "01-quantize" / "result.json",
                                                   lambda j: {**j, "outputs": "nonsense"}),
}
#: Damage to a later stage redoes that stage only; damage to the run's own files redoes nothing.
LATER = {
    "evaluate result.json wrong shape": ("02-evaluate/result.json", "{\"fingerprint\": 1}", [True, False, False]),
    "manifest.json garbage": ("manifest.json", "not json", [True, True, True]),
    "report.json garbage": ("report.json", "[", [True, True, True]),
}


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))


def _edit_json(path: Path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("finished")
    f = recipe_file(tmp, tiny_model_dir, memory=False)
    report = run_inproc(f, tmp / "run")
    return f, tmp / "run", quality(report)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_stage_output_is_redone_not_trusted(tmp_path, finished_run, damage):
    f, source, expected = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    DAMAGE[damage](run_dir)
    report = run_inproc(f, run_dir)
    assert resumed(report) == [False, False, False]  # the damaged stage and every stage after it ran again
    assert quality(report) == expected
    again = run_inproc(f, run_dir)
    assert resumed(again) == [True, True, True]


@pytest.mark.parametrize("damage", list(LATER))
def test_damage_after_the_first_stage_redoes_only_what_it_touched(tmp_path, finished_run, damage):
    f, source, expected = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    name, text, want = LATER[damage]
    (run_dir / name).write_text(text)
    report = run_inproc(f, run_dir)
    assert resumed(report) == want
    assert quality(report) == expected


def test_serve_and_app_refuse_a_run_with_a_corrupt_manifest_naming_it(tmp_path, finished_run):
    _, source, _ = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    for text in ("not json", "[1, 2]", '{"stages": "x"}'):
        (run_dir / "manifest.json").write_text(text)
        r = cli("serve", run_dir, "--port", "0", timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert f"{run_dir / 'manifest.json'}` is unreadable" in r.stderr and "Fix:" in r.stderr


def wait_for_lock(run_dir: Path, timeout_s: float = 120) -> None:
    """Until a run started in the background holds the folder's lock (its imports take a few seconds)."""
    deadline = time.monotonic() + timeout_s
    while not (run_dir / ".llmcompress.lock").exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def test_two_runs_into_one_folder_the_second_refuses_or_waits(tmp_path, tiny_model_dir):
    f = recipe_file(tmp_path, tiny_model_dir, memory=False)
    run_dir = tmp_path / "run"
    first = start("run", f, "--output", run_dir, "--quiet")
    wait_for_lock(run_dir)
    second = cli("run", f, "--output", run_dir, "--quiet")
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    assert f"is in use by another run (pid {first.pid}" in second.stderr and "--wait" in second.stderr
    waiting = cli("run", f, "--output", run_dir, "--quiet", "--wait")
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert waiting.returncode == 0 and "waiting for the other run" in waiting.stderr, waiting.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert resumed(report) == [True, True, True]  # it started after the first had finished everything


def test_a_killed_runs_lock_is_not_stale(tmp_path, tiny_model_dir):
    f = recipe_file(tmp_path, tiny_model_dir, memory=False)
    run_dir = tmp_path / "run"
    p = start("run", f, "--output", run_dir, "--quiet")
    wait_for_lock(run_dir)
    p.kill()
    p.communicate(timeout=60)
    r = cli("run", f, "--output", run_dir, "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]


def small_disk(path: Path, size: str, options: str = "") -> list[str] | None:
    """Mount a tmpfs of ``size`` on ``path`` (root); None when this machine does not allow it."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    return None if r.returncode else ["umount", str(path)]


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def mount(name: str, size: str, options: str = "") -> Path:
        path = tmp_path / name
        umount = small_disk(path, size, options)
        if umount is None:
            pytest.fail("mounting a small tmpfs failed: these fault tests need root (CI and the dev machines are)")
        mounted.append(umount)
        return path

    yield mount
    for cmd in mounted:
        subprocess.run(cmd, capture_output=True)


def test_a_full_disk_stops_with_the_path_and_the_space_needed_and_resumes_elsewhere(tmp_path, tiny_model_dir,
                                                                                   tmpfs):
    f = recipe_file(tmp_path, tiny_model_dir, memory=False)
    disk = tmpfs("small", "150k")
    r = cli("run", f, "--output", disk / "run", "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"the disk is full while writing `{disk / 'run'}" in r.stderr
    assert "free there; this run needs about" in r.stderr and "Fix:" in r.stderr
    assert not (disk / "run" / "01-quantize" / "result.json").exists()  # nothing half-written is trusted
    # The same command with room to spare finishes, from a copy of what was there.
    shutil.copytree(disk / "run", tmp_path / "roomy")
    ok = cli("run", f, "--output", tmp_path / "roomy", "--quiet")
    assert ok.returncode == 0, ok.stderr[-3000:]


@pytest.mark.parametrize("kind", ["read-only disk", "immutable folder", "a file", "under a file"])
def test_an_unwritable_output_is_refused_before_anything_runs(tmp_path, tiny_model_dir, tmpfs, kind):
    f = recipe_file(tmp_path, tiny_model_dir, memory=False)
    if kind == "read-only disk":
        out, why = tmpfs("ro", "1m", ",ro") / "run", "is on a read-only file system"
    elif kind == "immutable folder":
        folder = tmp_path / "locked"
        folder.mkdir()
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.fail("chattr +i failed: these fault tests need root on a file system with attributes")
        out, why = folder / "run", "is not writable (permission denied)"
    elif kind == "a file":
        out, why = tmp_path / "file.txt", "is a file, not a folder"
        out.write_text("keep me")
    else:
        (tmp_path / "file.txt").write_text("keep me")
        out, why = tmp_path / "file.txt" / "run", "which is a file, not a folder"
    try:
        t0 = time.perf_counter()
        r = cli("run", f, "--output", out, "--quiet")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert why in r.stderr and "Fix:" in r.stderr and str(out) in r.stderr
        assert time.perf_counter() - t0 < 60  # refused up front, not after the stages
    finally:
        subprocess.run(["chattr", "-i", str(tmp_path / "locked")], capture_output=True)
    if kind in ("a file", "under a file"):
        assert (tmp_path / "file.txt").read_text() == "keep me"


@pytest.mark.parametrize("target", ["folder with files", "working directory", "sweep folder"])
def test_fresh_never_deletes_what_a_run_did_not_write(tmp_path, tiny_model_dir, target):
    f = recipe_file(tmp_path, tiny_model_dir, memory=False)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    (folder / "logs").mkdir()  # a name a run writes too: still not ours without a manifest
    if target == "sweep folder":
        (folder / "sweep.json").write_text("{}")
    out, cwd = (Path("."), folder) if target == "working directory" else (folder, ROOT)
    before = sorted(p.name for p in folder.iterdir())
    r = cli("run", f, "--output", out, "--fresh", "--quiet", cwd=cwd)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "is not a run folder" in r.stderr and "will not delete" in r.stderr
    assert sorted(p.name for p in folder.iterdir()) == before


def test_fresh_on_a_run_folder_removes_only_what_the_run_wrote(tmp_path, finished_run):
    f, source, expected = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    (run_dir / "my-notes.md").write_text("mine")
    (run_dir / "01-mine").mkdir()  # not a stage type: not ours either
    r = cli("run", f, "--output", run_dir, "--fresh", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run_dir / "my-notes.md").read_text() == "mine" and (run_dir / "01-mine").is_dir()
    assert resumed(json.loads((run_dir / "report.json").read_text())) == [False, False, False]
