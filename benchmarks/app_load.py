"""Load test of the comparison app: N concurrent chat users against a running app on this machine (loopback only).

    python app.py --runs runs --port 7861 &                      # the app under test
    python benchmarks/app_load.py --url http://127.0.0.1:7861 --users 20 --label smollm2
    python benchmarks/app_load.py --runs runs --users 20              # starts its own app in-process first

Every user is its own gradio_client session and sends ``--requests`` chats (all users start together). Each request
ends as answered (every column replied), refused (the queue was full: the app's clean refusal) or failed (any other
error); one that ends as none of these by the deadline is lost. Bounded: at most 50 users x 5 requests, and the whole
run stops after ``--deadline-s``. Prints and writes benchmarks/results/app_load-<label>.json: counts, p50/p95 latency.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import ipaddress
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout: `python benchmarks/app_load.py`
PROMPTS = ("What is a list in Python?", "Name three colours.", "Say hello in French.", "What is 2 + 2?",
           "Describe the sea in one sentence.")


def loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def percentile(values: list[float], q: float) -> float | None:
    from llmcompress.backends.base import percentile as pct

    return pct(values, q) if values else None


def one_user(url: str, user: int, requests: int, max_new_tokens: int, timeout_s: float, start: threading.Barrier,
             deadline: float) -> list[dict]:
    from gradio_client import Client

    try:
        client = Client(url, verbose=False)
        info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/chat"]["parameters"]
        keys = next(p for p in info if p["parameter_name"] == "keys_")["parameter_default"]
    except BaseException:
        start.abort()  # the other users stop waiting for this one (BrokenBarrierError), and the run ends
        raise
    start.wait(timeout=max(1.0, deadline - time.perf_counter()))
    out = []
    for i in range(requests):
        prompt = PROMPTS[(user + i) % len(PROMPTS)]
        t0 = time.perf_counter()
        rec = {"user": user, "request": i, "prompt": prompt}
        left = deadline - time.perf_counter()
        if left <= 0:
            out.append({**rec, "status": "lost", "error": "not sent: the run's deadline passed"})
            continue
        job = client.submit(prompt, "You are a helpful assistant.", keys, "hf", True, 0.7, 0.95, max_new_tokens,
                            False, api_name="/chat")
        try:
            result = job.result(timeout=min(timeout_s, left))
            replies = result[1:1 + len(keys)]
            stats = result[1 + len(keys):]
            ok = all(r and r[-1]["role"] == "assistant" for r in replies) and all("**done**" in s for s in stats)
            rec.update(status="answered" if ok else "failed", error=None if ok else f"incomplete: {stats}")
        except (TimeoutError, cf.TimeoutError):  # Future.result's timeout (not the builtin one before 3.11)
            rec.update(status="lost", error=f"no answer within {min(timeout_s, left):.0f} s")
            job.cancel()
        except Exception as e:  # noqa: BLE001 - classified below: the queue's refusal vs anything else
            msg = str(e)
            rec.update(status="refused" if "queue is full" in msg.lower() else "failed", error=msg[:300])
        rec["latency_s"] = round(time.perf_counter() - t0, 3)
        out.append(rec)
    return out


def run(url: str, users: int, requests: int, max_new_tokens: int, timeout_s: float, deadline_s: float) -> dict:
    start = threading.Barrier(users)
    deadline = time.perf_counter() + deadline_s
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(users) as ex:
        futures = [ex.submit(one_user, url, u, requests, max_new_tokens, timeout_s, start, deadline)
                   for u in range(users)]
        cf.wait(futures)
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:  # the cause, rather than the other users' BrokenBarrierError it led to
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        records = [r for f in futures for r in f.result()]
    wall = time.perf_counter() - t0
    counts = {s: sum(r["status"] == s for r in records) for s in ("answered", "refused", "failed", "lost")}
    answered = [r["latency_s"] for r in records if r["status"] == "answered"]
    refused = [r["latency_s"] for r in records if r["status"] == "refused"]
    return {
        "url": url, "users": users, "requests_per_user": requests, "sent": len(records),
        "max_new_tokens": max_new_tokens,
        "wall_s": round(wall, 1), "counts": counts,
        "answered_latency_s": {"p50": percentile(answered, 50), "p95": percentile(answered, 95),
                               "max": max(answered) if answered else None},
        "refused_latency_s": {"p50": percentile(refused, 50), "max": max(refused) if refused else None},
        "errors": sorted({r["error"] for r in records if r["status"] in ("failed", "lost")}),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "records": records,
    }


def start_app(runs: Path, port: int):
    from llmcompress.ui.app import build_app, launch
    from llmcompress.ui.launch import parse_args, prepare

    config = parse_args(["--runs", str(runs), "--backends", "hf", "--no-default", "--port", str(port)])
    pool = prepare(config, log=lambda m: print(m, file=sys.stderr))
    demo, url = launch(build_app(pool, config), config, block=False)
    return demo, pool, url


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running app on this machine (127.0.0.1 / localhost / ::1 only)")
    p.add_argument("--runs", type=Path, help="start an app on these run folders instead (hf backend)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--users", type=int, default=20)
    p.add_argument("--requests", type=int, default=1, help="chats per user, one after another")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--timeout-s", type=float, default=600, help="one request, queue wait included")
    p.add_argument("--deadline-s", type=float, default=900, help="the whole run")
    p.add_argument("--label", default="app")
    args = p.parse_args(argv)
    if not 1 <= args.users <= 50 or not 1 <= args.requests <= 5 or args.deadline_s > 1800:
        print("app_load: --users 1..50, --requests 1..5, --deadline-s <= 1800 (bounded by design)", file=sys.stderr)
        return 2
    demo = pool = None
    if args.url:
        if not loopback(args.url):
            print(f"app_load: {args.url} is not a loopback address; this load test only targets this machine.",
                  file=sys.stderr)
            return 2
        url = args.url
    elif args.runs:
        from llmcompress.serving.server import free_port

        demo, pool, url = start_app(args.runs, args.port or free_port())
    else:
        print("app_load: pass --url of a running app, or --runs DIR to start one", file=sys.stderr)
        return 2
    try:
        result = run(url, args.users, args.requests, args.max_new_tokens, args.timeout_s, args.deadline_s)
    except Exception as e:  # noqa: BLE001 - a user could not connect: no load test ran
        print(f"app_load: the users could not start against {url} ({type(e).__name__}: {str(e)[:300]}). "
              "Fix: check that the app is running there (python app.py --port N) and answers /chat.", file=sys.stderr)
        return 2
    finally:
        if demo is not None:
            demo.close()
            pool.close()
    result["label"] = args.label
    out = ROOT / "benchmarks" / "results" / f"app_load-{args.label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    c, lat = result["counts"], result["answered_latency_s"]

    def fmt(v):
        return "—" if v is None else f"{v:.1f} s"

    print(f"{result['sent']} requests from {args.users} users in {result['wall_s']} s: {c['answered']} answered, "
          f"{c['refused']} refused (queue full), {c['failed']} failed, {c['lost']} lost; answered latency "
          f"p50 {fmt(lat['p50'])}, p95 {fmt(lat['p95'])}, max {fmt(lat['max'])}; refused in "
          f"{fmt(result['refused_latency_s']['max'])} at most")
    for e in result["errors"]:
        print(f"  error: {e}")
    print(f"written: {out}")
    return 0 if c["failed"] == 0 and c["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
