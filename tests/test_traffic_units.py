"""Traffic primitives, canary verdicts, A/B statistics and JWT checks, through their public
functions (no server needed)."""

from __future__ import annotations

import threading
import time
from collections import Counter

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tiffin.auth import AuthError, AuthSettings, authorize, check_startup, mint
from tiffin.families import Families, LocalFamily
from tiffin.lifecycle import stats as vm
from tiffin.lifecycle.ab_stats import compare
from tiffin.lifecycle.manager import LifecycleManager, breach, split_id
from tiffin.lifecycle.traffic import (
    FileStateBackend,
    Thresholds,
    TrafficSettings,
    pick_version,
    sticky_bucket,
    validate_weights,
)
from tiffin.model_pool import ModelPool
from tiffin.runtimes import LoadedModel


def test_weighted_buckets_split_exactly_and_stick() -> None:
    weights = {"v1": 90, "v2": 10}
    counts = Counter(pick_version(weights, b) for b in range(10_000))
    assert counts == {"v1": 9000, "v2": 1000}
    entities = [f"card_{i}" for i in range(20_000)]
    share = sum(pick_version(weights, sticky_bucket("card_fraud", e)) == "v2" for e in entities)
    assert abs(share / len(entities) - 0.10) < 0.01
    assert {pick_version(weights, sticky_bucket("card_fraud", "card_7")) for _ in range(5)} == {
        pick_version(weights, sticky_bucket("card_fraud", "card_7"))
    }


@pytest.mark.parametrize(
    ("weights", "problem"),
    [({}, "at least one"), ({"a": -5, "b": 105}, "negative"), ({"a": 60, "b": 30}, "sum to 100")],
)
def test_invalid_weights_are_named(weights: dict[str, int], problem: str) -> None:
    assert problem in (validate_weights(weights) or "")
    assert validate_weights({"a": 60, "b": 40}) is None


def test_split_id_requires_name_and_version() -> None:
    assert split_id("card_fraud:v2") == ("card_fraud", "v2")
    with pytest.raises(Exception, match="name:version"):
        split_id("card_fraud")


def test_file_backend_compare_and_set_is_atomic_across_threads(tmp_path) -> None:
    backend = FileStateBackend(str(tmp_path), ack_ttl_s=1.0)

    def bump(_: int) -> None:
        for _ in range(25):
            backend.update(
                lambda s: s.family("m").__setattr__("reload_token", s.family("m").reload_token + 1)
            )

    threads = [threading.Thread(target=bump, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = FileStateBackend(str(tmp_path), ack_ttl_s=1.0).load()  # a fresh reader: durable
    assert state.revision == 100 == backend.revision()
    assert state.families["m"].reload_token == 100


def test_file_backend_acks_expire_and_lease_is_exclusive(tmp_path) -> None:
    backend = FileStateBackend(str(tmp_path), ack_ttl_s=0.3)
    backend.ack("w1", 3)
    assert backend.acks() == {"w1": 3}
    time.sleep(0.4)
    assert backend.acks() == {}
    assert backend.try_lead("a", 5) and not backend.try_lead("b", 5) and backend.try_lead("a", 5)


class GatedPool(ModelPool):
    """A pool whose load of version "slow" waits until the test lets it go on."""

    def __init__(self) -> None:
        super().__init__("gated", "v1")
        self.entered, self.release = threading.Event(), threading.Event()

    def load(self, version: str) -> LoadedModel:
        if version == "slow":
            self.entered.set()
            self.release.wait(10)
        return super().load(version)  # not in the model store: the version is not routed


def test_concurrent_refreshes_never_apply_an_older_revision_last(tmp_path) -> None:
    backend = FileStateBackend(str(tmp_path), ack_ttl_s=30)
    pool = GatedPool()

    families = Families({pool.family: LocalFamily(pool)}, generic=None)
    manager = LifecycleManager(families, backend, TrafficSettings())
    backend.update(lambda s: s.family("gated").__setattr__("weights", {"slow": 100}))
    slow = threading.Thread(target=manager.refresh)  # the background tick, loading a version
    slow.start()
    assert pool.entered.wait(10)
    backend.update(lambda s: s.family("gated").__setattr__("weights", {"fast": 100}))
    admin = threading.Thread(target=manager.refresh)  # an admin call's wait_for_acks
    admin.start()
    time.sleep(0.3)
    pool.release.set()
    slow.join(10)
    admin.join(10)
    assert manager.applied_revision == backend.revision() == 2
    assert manager.state.families["gated"].weights == {"fast": 100}
    assert backend.acks() == {manager.worker_id: 2}


def _snap(ok: int, err: int, latency_s: float, score: float) -> vm.Snapshot:
    snap = vm.empty()
    snap["ok"], snap["error"] = float(ok), float(err)
    n = ok + err
    for i, bound in enumerate(vm.LATENCY_BUCKETS):
        snap["latency"][i] = float(n) if latency_s <= bound else 0.0
    snap["latency"][-1] = float(n)
    snap["latency_sum"] = latency_s * n
    for i, bound in enumerate(vm.SCORE_BUCKETS):
        snap["scores"][i] = float(ok) if score <= bound else 0.0
    snap["scores"][-1] = float(ok)
    snap["score_sum"], snap["score_count"] = score * ok, float(ok)
    return snap


def test_canary_verdicts() -> None:
    limits = Thresholds(min_samples=20)
    healthy = _snap(100, 0, 0.004, 0.1)
    assert breach(_snap(100, 0, 0.004, 0.1), healthy, limits) is None
    assert breach(_snap(5, 5, 0.004, 0.1), healthy, limits) is None  # too few samples to judge
    assert "error rate" in (breach(_snap(90, 10, 0.004, 0.1), healthy, limits) or "")
    assert "p99" in (breach(_snap(100, 0, 2.0, 0.1), healthy, limits) or "")
    assert "PSI" in (breach(_snap(100, 0, 0.004, 0.95), healthy, limits) or "")


def test_ab_statistics() -> None:
    small = compare(_snap(50, 0, 0.004, 0.2), _snap(50, 0, 0.004, 0.2), ["error_rate"])
    assert small["conclusion"] == "insufficient_data"
    same = compare(_snap(1000, 10, 0.004, 0.2), _snap(1000, 11, 0.004, 0.2), ["error_rate"])
    assert same["conclusion"] == "no_significant_difference"
    assert same["metrics"]["error_rate"]["p_value"] > 0.5
    worse = compare(_snap(1000, 10, 0.004, 0.2), _snap(900, 110, 0.004, 0.2), ["error_rate"])
    low, high = worse["metrics"]["error_rate"]["ci95"]
    assert worse["conclusion"] == "significant_difference" and 0 < low < high
    slower = compare(
        _snap(500, 0, 0.002, 0.2), _snap(500, 0, 0.02, 0.2), ["response_time", "accuracy"]
    )
    assert slower["metrics"]["response_time"]["significant"] is True
    assert "unavailable" in slower["metrics"]["accuracy"]


def test_hs256_tokens_scopes_and_expiry() -> None:
    settings = AuthSettings(jwt_secret_key="s" * 40)
    claims = authorize(f"Bearer {mint('s' * 40, 'models:write', 60)}", "models:write", settings)
    assert claims["scope"] == "models:write"
    with pytest.raises(AuthError) as denied:
        authorize(f"Bearer {mint('s' * 40, 'models:write', 60)}", "traffic:write", settings)
    assert denied.value.status == 403
    with pytest.raises(AuthError, match="expired"):
        authorize(f"Bearer {mint('s' * 40, 'admin', -30)}", "traffic:write", settings)
    no_exp = jwt.encode({"scope": "admin"}, "s" * 40, algorithm="HS256")
    with pytest.raises(AuthError, match="exp"):
        authorize(f"Bearer {no_exp}", "admin", settings)
    with pytest.raises(AuthError, match="missing bearer"):
        authorize(None, "admin", settings)


def test_rs256_tokens_with_a_public_key() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    settings = AuthSettings(public_key=public_pem)
    good = jwt.encode({"scope": "admin", "exp": int(time.time()) + 60}, key, algorithm="RS256")
    assert authorize(f"Bearer {good}", "traffic:write", settings)["scope"] == "admin"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode({"scope": "admin", "exp": int(time.time()) + 60}, other, algorithm="RS256")
    with pytest.raises(AuthError):
        authorize(f"Bearer {forged}", "admin", settings)
    hs = mint("x" * 40, "admin", 60)  # HS256 is not accepted when only a public key is set
    with pytest.raises(AuthError, match="algorithm"):
        authorize(f"Bearer {hs}", "admin", settings)


def test_an_inline_pem_key_is_never_looked_up_as_a_file(tmp_path) -> None:
    """A PEM's base64 holds '/', so as a path it has components; one longer than 255 characters
    made `Path.exists()` raise ENAMETOOLONG: a 500 on admin calls, for one random key in a few."""
    long_run = "-----BEGIN PUBLIC KEY-----\n" + "A" * 300 + "/B\n-----END PUBLIC KEY-----\n"
    assert AuthSettings(public_key=long_run).rs256_key() == long_run
    key_file = tmp_path / "key.pem"
    key_file.write_text(long_run)
    assert AuthSettings(public_key=str(key_file)).rs256_key() == long_run
    with pytest.raises(ValueError, match="neither a PEM public key nor"):
        AuthSettings(public_key=str(tmp_path / "missing.pem"))


def test_production_refuses_placeholder_secrets() -> None:
    for secret in (None, "your-secret-key", "short"):
        with pytest.raises(RuntimeError, match="JWT_SECRET_KEY"):
            check_startup(AuthSettings(jwt_secret_key=secret), "production")
    check_startup(AuthSettings(jwt_secret_key="your-secret-key"), "development")
    check_startup(AuthSettings(jwt_secret_key="k" * 48), "production")


def test_a_family_met_for_the_first_time_is_looked_up_off_the_event_loop() -> None:
    """A remote generic runner is asked whether a name exists with a blocking call; the router
    makes it on a worker thread, so a client asking for unknown names stalls only itself."""
    import asyncio

    from tiffin.errors import ModelNotFound
    from tiffin.lifecycle.router import Router

    def slow_lookup(name: str) -> LocalFamily:
        time.sleep(0.5)  # a runner far away answering "not in the store"
        raise ModelNotFound(f"model {name!r} is not in the model store")

    router = Router(Families({}, generic=slow_lookup), lifecycle=None)

    async def run() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        with pytest.raises(ModelNotFound):
            await router.choose("nope", entity=None)
        task.cancel()
        return ticks

    assert asyncio.run(run()) >= 20  # ~50 while the lookup waits; 0 if it blocked the loop
