"""`make soak`: sustained mixed load with repeated version swaps, RSS of every process over time.

Starts a seeded redis-server and Tiffin as deployed (`bentoml serve`, 2 workers, the LLM loaded),
registers a second `card_fraud` version through the admin API, then for `--minutes` holds a paced
mix of every scoring route (plus a few LLM generations) from several keep-alive clients while
activating the two versions in turn every `--swap-every-s`. Every `--sample-every-s` it records
the RSS of each process of the tree (arbiter, each worker). Verdict, per process: RSS growth from
the end of warm-up to the last minute under 5% is PASS; otherwise PLATEAU when the second half of
the run grew less than a fifth of the first half (memory settled at a higher level), else LEAK.

Usage: `python -m bench.soak [--minutes 10] [--rate 80]`; JSON in bench/results/soak-<time>.json.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import random
import statistics
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.systems import RESULTS, Redis, tiffin
from tiffin.auth import mint

SECRET = "soak-secret-0123456789abcdefghijklmnop"


def _bodies(rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    card = f"card_{rng.randrange(10_000):08d}"
    return [
        ("/score/fraud", {"card_id": card, "transaction_amount": rng.uniform(1, 3000)}),
        (
            "/score/personalization",
            {"user_id": f"user_{rng.randrange(10_000):08d}", "item_id": "item_electronics_001"},
        ),
        (
            "/score/batch",
            {
                "model_type": "fraud_detection",
                "requests": [
                    {"card_id": f"card_{rng.randrange(10_000):08d}", "transaction_amount": 50.0}
                    for _ in range(64)
                ],
            },
        ),
        (
            "/predict/fraud",
            {
                "user_id": "user_123",
                "ip_address": "192.168.1.1",
                "user_agent": "Mozilla/5.0",
                "impressions_24h": rng.randrange(1, 5000),
                "clicks_24h": rng.randrange(0, 50),
            },
        ),
        (
            "/predict/ctr",
            {
                "placement_id": "placement_456",
                "ad_format": "banner",
                "user_segments": ["sports", "tech"],
                "time_of_day": rng.randrange(24),
                "day_of_week": rng.randrange(7),
            },
        ),
        (
            "/predict/bid",
            {
                "placement_id": "placement_789",
                "floor_cpm": 2.5,
                "predicted_ctr": 0.025,
                "competition_level": "medium",
                "budget_remaining": 1000.0,
            },
        ),
        ("/v1/models/predict", {"instances": [[5.1, 3.5, 1.4, 0.2]], "version": "v2"}),
        (
            "/predict",
            {
                "model_name": "your_model",
                "features": {"feature1": [1.0, 2.0], "feature2": [0.5, 1.5]},
            },
        ),
        ("/score/fraud", {"card_id": card, "transaction_amount": -1}),  # a client error (400)
    ]


def _role(proc: psutil.Process) -> str:
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "gone"
    if "_bentoml_impl.worker.service" in cmd:
        wid = cmd.split("--worker-id", 1)[1].split()[0] if "--worker-id" in cmd else "?"
        return f"worker-{wid}"
    if "bentoml serve" in cmd or "bentoml', 'serve" in cmd or " serve service:" in cmd:
        return "arbiter"
    return cmd.split()[-1][:40] if cmd else "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup-minutes", type=float, default=2.0)
    parser.add_argument("--rate", type=float, default=80.0, help="requests/s over all clients")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--swap-every-s", type=float, default=20.0)
    parser.add_argument("--sample-every-s", type=float, default=10.0)
    parser.add_argument("--llm-every", type=int, default=200, help="one /generate per N requests")
    args = parser.parse_args(argv)

    redis = Redis()
    system = tiffin(redis.url, workers=2, rss_exclude="", llm=True)
    system.env["JWT_SECRET_KEY"] = SECRET
    system.env["TIFFIN_TRAFFIC_POLL_INTERVAL_S"] = "0.2"
    system.start()
    token = {"Authorization": f"Bearer {mint(SECRET, 'admin', 7200)}"}
    url = system.url
    import bentoml

    artifact = Path(bentoml.models.get("card_fraud:v1.0").path, "model.json").read_bytes()
    versions = ["v1.0", f"v-soak-{int(time.time())}"]
    created = httpx.post(
        f"{url}/models/register",
        json={
            "name": "card_fraud",
            "version": versions[1],
            "artifact_base64": base64.b64encode(artifact).decode(),
            "filename": "model.json",
            "feature_names": _card_features(),
            "task": "binary",
        },
        headers=token,
        timeout=120,
    )
    if created.status_code != 201:
        system.stop()
        redis.stop()
        raise SystemExit(f"register failed: {created.status_code} {created.text}")

    started = time.monotonic()
    stop_at = started + args.minutes * 60
    statuses: Counter[str] = Counter()
    lock = threading.Lock()
    samples: list[dict[str, Any]] = []
    swaps: list[dict[str, Any]] = []

    def client(n: int) -> None:
        rng = random.Random(n)
        interval = args.clients / args.rate
        next_at = time.monotonic()
        sent = 0
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.monotonic() < stop_at:
                sent += 1
                if sent % args.llm_every == 0:
                    path, body = "/generate", {"prompt": "The card", "max_tokens": 16, "seed": n}
                else:
                    path, body = rng.choice(_bodies(rng))
                try:
                    code = str(http.post(path, json=body).status_code)
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                with lock:
                    statuses[f"{path} {code}"] += 1
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))

    def swapper() -> None:
        i = 0
        while time.monotonic() + args.swap_every_s < stop_at:
            time.sleep(args.swap_every_s)
            i += 1
            version = versions[i % 2]
            t0 = time.monotonic()
            r = httpx.post(
                f"{url}/models/card_fraud:{version}/activate", json={}, headers=token, timeout=120
            )
            swaps.append(
                {
                    "t_s": round(t0 - started, 1),
                    "version": version,
                    "status": r.status_code,
                    "took_s": round(time.monotonic() - t0, 2),
                }
            )

    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    threads.append(threading.Thread(target=swapper))
    for t in threads:
        t.start()
    try:
        while time.monotonic() < stop_at:
            row: dict[str, Any] = {"t_s": round(time.monotonic() - started, 1)}
            for proc in system.processes():
                with contextlib.suppress(psutil.Error):
                    row[f"{_role(proc)}:{proc.pid}"] = proc.memory_info().rss
            samples.append(row)
            line = "  ".join(
                f"{k.split(':')[0]}={v / 2**20:.0f}MB" for k, v in row.items() if k != "t_s"
            )
            print(f"t={row['t_s']:>6.0f}s  {line}", flush=True)
            time.sleep(args.sample_every_s)
        for t in threads:
            t.join()
    finally:
        system.stop()
        redis.stop()

    verdicts = _verdicts(samples, args.warmup_minutes * 60)
    errors = {k: v for k, v in statuses.items() if not k.endswith((" 200", " 400"))}
    failed_swaps = [s for s in swaps if s["status"] != 200]
    overall = "PASS" if all(v["verdict"] == "PASS" for v in verdicts.values()) else "FAIL"
    if overall == "FAIL" and all(v["verdict"] in ("PASS", "PLATEAU") for v in verdicts.values()):
        overall = "PLATEAU"
    result = {
        "minutes": args.minutes,
        "rate": args.rate,
        "requests": sum(statuses.values()),
        "statuses": dict(statuses),
        "unexpected": errors,
        "swaps": swaps,
        "samples": samples,
        "verdicts": verdicts,
        "verdict": overall,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1))
    for name, v in verdicts.items():
        print(
            f"{name:<24} warm {v['warm_mb']:7.1f} MB  last {v['last_mb']:7.1f} MB  "
            f"growth {v['growth_pct']:+6.2f}%  (1st half {v['first_half_mb']:+.1f} MB, "
            f"2nd half {v['second_half_mb']:+.1f} MB)  {v['verdict']}"
        )
    print(
        f"soak verdict: {overall} ({result['requests']} requests, {len(swaps)} swaps, "
        f"{len(failed_swaps)} failed, {sum(errors.values())} unexpected answers) -> {out}"
    )
    return 0 if overall in ("PASS", "PLATEAU") and not errors and not failed_swaps else 1


def _card_features() -> list[str]:
    from tiffin.featurize import CARD_FRAUD_FEATURES

    return list(CARD_FRAUD_FEATURES)


def _verdicts(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    names = {k for row in samples for k in row if k != "t_s"}
    end = samples[-1]["t_s"] if samples else 0.0
    for name in sorted(names):
        series = [(row["t_s"], row[name]) for row in samples if name in row]
        after = [(t, rss) for t, rss in series if t >= warmup_s]
        if len(after) < 4:
            continue
        warm = statistics.mean(rss for _, rss in after[:3])
        last = statistics.mean(rss for t, rss in after if t >= end - 60)
        middle = after[len(after) // 2][1]
        growth = (last - warm) / warm * 100
        first_half, second_half = middle - warm, last - middle
        if growth < 5:
            verdict = "PASS"
        elif second_half < first_half / 5:
            verdict = "PLATEAU"
        else:
            verdict = "LEAK"
        out[name] = {
            "warm_mb": warm / 2**20,
            "last_mb": last / 2**20,
            "growth_pct": growth,
            "first_half_mb": first_half / 2**20,
            "second_half_mb": second_half / 2**20,
            "verdict": verdict,
        }
    return out


if __name__ == "__main__":
    raise SystemExit(main())
