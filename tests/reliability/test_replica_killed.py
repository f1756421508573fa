"""A replica SIGKILLed in the middle of a canary's analysis: the other replicas finish it.

Three real `bentoml serve` replicas (one worker each) share one real redis-server. The victim is
started first, so it holds the lifecycle leader lease (it is the one running canary analysis),
and the canary is deployed through it too. Clients score on all three; mid-analysis every process
of the victim (serve process and workers) is SIGKILLed under traffic (no shutdown hook runs:
nothing is published on the way out), while clients keep scoring on the two survivors.

Pass criterion (docs/reliability.md): a survivor takes the leader lease over; the canary is
promoted, with both of its decisions (step to 100 %, completion) taken after the kill; both
survivors report the same deployment, the same traffic split and the same per-version counts,
and each then answers with the canary only;
those counts are what clients were served (the victim's published part included, at most its
last unpublished moment lost, nothing counted twice); the victim's published counts are moved
from the fleet's `live` hash into `retired` (tiffin/lifecycle/fleet.py); zero failed requests on
the survivors. Nothing is mocked.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import psutil
import pytest
import redis

from tests.conftest import RedisServer, Served, kill_all, seeded, serve, stop, wait_for
from tests.test_lifecycle_e2e import card_fraud_artifact
from tests.test_replicas import eventually
from tiffin.auth import mint
from tiffin.featurize import CARD_FRAUD_FEATURES

pytestmark = [pytest.mark.reliability, pytest.mark.e2e]

SECRET = "replica-kill-secret-0123456789abcdef"
PUBLISH_S = 0.25
ENV = {
    "JWT_SECRET_KEY": SECRET,
    "TIFFIN_WORKERS": "1",
    "TIFFIN_LLM_ENABLED": "false",
    "TIFFIN_TRAFFIC_POLL_INTERVAL_S": "0.1",
    "TIFFIN_METRICS_PUBLISH_INTERVAL_S": str(PUBLISH_S),
    # retire a silent replica after 3 s instead of 15 s: the test waits for it
    "TIFFIN_METRICS_REPLICA_TIMEOUT_S": "3",
}
CANARY = "v3-replica-kill"
STEP_WINDOW_S = 8.0  # the kill lands ~4 s into the first step, so a survivor decides it
# What a killed replica may take with it: what it served after its last publish (one interval,
# more when a busy box delays the publishing thread), plus answers cut off in flight.
LOST_WINDOW_S = 1.5
TRAFFIC = "tiffin:traffic"  # TrafficSettings.redis_key's default


@dataclass
class Answer:
    at: float
    replica: int
    version: str


@dataclass
class Clients:
    """One client thread per replica scoring `/score/fraud` back to back (paced), recording every
    answer; `stop(i)` ends replica i's client."""

    replicas: list[Served]
    answers: list[Answer] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)
    _stopped: list[threading.Event] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Clients:
        for index in range(len(self.replicas)):
            self._stopped.append(threading.Event())
            thread = threading.Thread(target=self._drive, args=(index,), daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def _drive(self, index: int) -> None:
        stopped = self._stopped[index]
        with httpx.Client(base_url=self.replicas[index].url, timeout=10) as client:
            n = 0
            while not stopped.is_set():
                n += 1
                body = {"card_id": f"card_{(n * 7 + index) % 5000:08d}", "transaction_amount": 30.0}
                try:
                    response = client.post("/score/fraud", json=body)
                except httpx.HTTPError as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                else:
                    if response.status_code == 200:
                        version = response.json()["model_version"]
                        with self._lock:
                            self.answers.append(Answer(time.monotonic(), index, version))
                        stopped.wait(0.01)
                        continue
                    outcome = f"{response.status_code} {response.text[:200]}"
                if not stopped.is_set():
                    with self._lock:
                        self.failures.append((index, outcome))
                stopped.wait(0.01)

    def stop(self, *indices: int) -> None:
        for index in indices or range(len(self.replicas)):
            self._stopped[index].set()
            self._threads[index].join(15)

    def served(self, version: str, replicas: set[int], since: float = 0.0) -> int:
        with self._lock:
            return sum(
                1
                for a in self.answers
                if a.version == version and a.replica in replicas and a.at >= since
            )


def descendants(pid: int) -> set[int]:
    return {p.pid for p in psutil.Process(pid).children(recursive=True)}


def leader_pid(store: redis.Redis) -> int | None:
    """The process id of the worker holding the lifecycle leader lease (its worker id is
    "<pid>-<random>", tiffin/lifecycle/manager.py)."""
    lease = store.get(f"{TRAFFIC}:leader")
    return int(str(lease).split("-")[0]) if lease else None


def admin(replica: Served, path: str, body: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {mint(SECRET, 'admin', 600)}"}
    return httpx.post(f"{replica.url}{path}", json=body, headers=headers, timeout=120)


@pytest.fixture(scope="module")
def fleet_redis(model_store: str) -> Iterator[RedisServer]:
    server = seeded(RedisServer().start(), 5000)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replicas(fleet_redis: RedisServer) -> Iterator[list[Served]]:
    """The victim first (it takes the leader lease while alone), then two survivors."""
    env = {**ENV, "REDIS_URL": fleet_redis.url}
    started = [serve(env, "serve-kill-victim.log")]
    try:
        leader = redis.Redis.from_url(fleet_redis.url)
        wait_for(lambda: leader.get(f"{TRAFFIC}:leader") is not None, 10, "leader lease")
        with ThreadPoolExecutor(2) as pool:
            started += pool.map(lambda i: serve(env, f"serve-kill-survivor-{i}.log"), (1, 2))
        yield started
    finally:
        for served in started:
            stop(served)


def test_replica_killed_mid_canary_the_survivors_finish_the_analysis(
    replicas: list[Served], fleet_redis: RedisServer
) -> None:
    victim, survivors = replicas[0], replicas[1:]
    store = redis.Redis.from_url(fleet_redis.url, decode_responses=True)
    victim_workers = descendants(victim.proc.pid)
    assert leader_pid(store) in victim_workers, (leader_pid(store), victim_workers)

    registered = admin(
        survivors[0],
        "/models/register",
        {
            "name": "card_fraud",
            "version": CANARY,
            "artifact_base64": card_fraud_artifact(),
            "filename": "model.json",
            "feature_names": list(CARD_FRAUD_FEATURES),
            "task": "binary",
        },
    )
    assert registered.status_code == 201, registered.text

    clients = Clients(replicas).start()
    try:
        deploy = admin(
            victim,
            f"/models/card_fraud:{CANARY}/deploy",
            {
                "strategy": "canary",
                "steps": [50, 100],
                "analysis_window_s": STEP_WINDOW_S,
                # the gates that matter here are the sample count and errors; latency and score
                # shift on a box shared with other jobs are not what this test is about
                "thresholds": {"min_samples": 30, "max_p99_ms": None, "max_score_psi": None},
            },
        )
        assert deploy.status_code == 202, deploy.text
        deployment = f"/deployments/{deploy.json()['id']}"
        time.sleep(4.0)  # the victim serves canary traffic and publishes it
        assert clients.served(CANARY, {0}) >= 20

        # its replica id is "<host>-<pid of its serve process>-<random>" (tiffin/replica.py)
        victim_id = next(
            n for n in store.hkeys(f"{TRAFFIC}:stats:live") if f"-{victim.proc.pid}-" in n
        )
        killed_at = time.monotonic()
        kill_all(victim.proc)
        clients.stop(0)
        with socket.socket() as s:  # nothing answers on its port any more
            assert s.connect_ex(("127.0.0.1", int(victim.url.rsplit(":", 1)[1]))) != 0

        # a survivor's worker takes the lease over (it expires TrafficSettings.ack_ttl_s after
        # the victim's last renewal) and finishes the analysis: step to 100 %, then completion
        wait_for(
            lambda: leader_pid(store) not in {None, *victim_workers},
            15,
            "a survivor holding the leader lease",
        )
        survivor_clients = [httpx.Client(base_url=s.url, timeout=10) for s in survivors]
        status = eventually(
            lambda: [c.get(deployment).json()["status"] for c in survivor_clients],
            lambda got: got == ["completed"] * 2,
            timeout_s=3 * STEP_WINDOW_S + 15,
        )
        assert status == ["completed"] * 2, status
        promoted_at = time.monotonic()
        time.sleep(1.0)  # answers after the promotion: only the canary
    finally:
        clients.stop()

    # zero failures on the survivors: the kill, the lease handoff, the retirement cost nothing
    assert [f for f in clients.failures if f[0] != 0] == []
    for survivor in (1, 2):  # each routes by the outcome: the canary only
        assert clients.served("v1.0", {survivor}, since=promoted_at + 0.5) == 0
        assert clients.served(CANARY, {survivor}, since=promoted_at + 0.5) > 0

    details = [c.get(deployment).json() for c in survivor_clients]
    assert details[0] == details[1]  # one record, the same on every survivor
    kill_wall = time.time() - (time.monotonic() - killed_at)
    events = [(t["event"], t["at"]) for t in details[0]["transitions"]]
    assert [e for e, _ in events] == ["step", "step", "completed"], events
    assert all(at > kill_wall for _, at in events[1:]), (events, kill_wall)  # decided by survivors
    splits = [c.get("/v1/traffic-split?model=card_fraud").json() for c in survivor_clients]
    assert splits == [{CANARY: 100}] * 2

    # The victim is retired: out of `live`, its published counts in the permanent total.
    wait_for(
        lambda: victim_id not in store.hkeys(f"{TRAFFIC}:stats:live"), 10, "the victim's retirement"
    )
    assert store.get(f"{TRAFFIC}:stats:retired") is not None

    # Both survivors count what clients were served: their own answers exactly, the victim's
    # up to what it served after its last publish (never more than it answered, plus requests
    # cut off in flight, counted by the server but never answered).
    for version in ("v1.0", CANARY):
        counted = eventually(
            lambda v=version: [  # type: ignore[misc]
                c.get(f"/v1/metrics/{v}?model=card_fraud").json()["requests"]
                for c in survivor_clients
            ],
            lambda got: got[0] == got[1],
        )
        assert counted[0] == counted[1], (version, counted)
        by_survivors = clients.served(version, {1, 2})
        by_victim = clients.served(version, {0})
        lost_at_most = clients.served(version, {0}, since=killed_at - LOST_WINDOW_S)
        victims_part = counted[0] - by_survivors
        assert by_victim - lost_at_most <= victims_part <= by_victim + 1, (
            version,
            counted,
            by_survivors,
            by_victim,
            lost_at_most,
        )
    for client in survivor_clients:
        client.close()
