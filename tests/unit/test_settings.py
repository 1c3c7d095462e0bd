"""Settings from LONGHAUL_* env vars: defaults, overrides, and one-line config errors."""

from __future__ import annotations

import os

import pytest

from services import envnames
from services.api.settings import ApiSettings
from services.worker.settings import WorkerSettings
from services.ws_gateway.settings import GatewaySettings
from shared.errors import ConfigError
from shared.settings import CommonSettings, load


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from an environment without any LONGHAUL_ variable."""
    for name in list(os.environ):
        if name.startswith("LONGHAUL_"):
            monkeypatch.delenv(name)


def test_defaults_match_the_contract() -> None:
    """With no env vars, the settings are the contract's defaults."""
    s = load(CommonSettings)
    assert s.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.database_url == "postgresql://postgres@127.0.0.1:5432/longhaul"
    assert s.namespace == "longhaul"
    assert s.public_ws_url == "ws://127.0.0.1:8001/v1/ws"
    assert s.failpoints == ""
    api = load(ApiSettings)
    assert (api.api_host, api.api_port, api.max_body_bytes) == ("127.0.0.1", 8000, 1024 * 1024)
    worker = load(WorkerSettings)
    assert worker.worker_metrics_port == 8002
    assert worker.delivery_limit == 50  # well above the default max_attempts (5)


def test_the_public_gateway_url_follows_where_the_gateway_listens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """LONGHAUL_GATEWAY_HOST/PORT move the gateway: unless LONGHAUL_PUBLIC_WS_URL says
    otherwise, the API points browsers there (a wildcard address as this machine)."""
    monkeypatch.setenv("LONGHAUL_GATEWAY_PORT", "9001")
    assert load(ApiSettings).public_ws_url == "ws://127.0.0.1:9001/v1/ws"
    monkeypatch.setenv("LONGHAUL_GATEWAY_HOST", "0.0.0.0")
    assert load(ApiSettings).public_ws_url == "ws://127.0.0.1:9001/v1/ws"
    monkeypatch.setenv("LONGHAUL_GATEWAY_PORT", " 9001 ")  # the port's value, not its text
    assert load(ApiSettings).public_ws_url == "ws://127.0.0.1:9001/v1/ws"
    monkeypatch.setenv("LONGHAUL_GATEWAY_HOST", "::")  # IPv6 alone (IPV6_V6ONLY)
    assert load(ApiSettings).public_ws_url == "ws://[::1]:9001/v1/ws"
    monkeypatch.setenv("LONGHAUL_GATEWAY_HOST", "::1")
    assert load(GatewaySettings).public_ws_url == "ws://[::1]:9001/v1/ws"
    monkeypatch.setenv("LONGHAUL_PUBLIC_WS_URL", "wss://events.example.com/v1/ws")
    assert load(ApiSettings).public_ws_url == "wss://events.example.com/v1/ws"
    monkeypatch.setenv("LONGHAUL_GATEWAY_PORT", "not a port")
    with pytest.raises(ConfigError, match="LONGHAUL_GATEWAY_PORT"):
        load(ApiSettings)


def test_the_gateway_admits_the_apis_own_origin_wherever_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The contract's default allow-list: the API's own origin (LONGHAUL_API_HOST/PORT,
    its default port left out as a browser's Origin does) and any local port; a list
    given is kept, an empty one too (no browser)."""
    local = "http://localhost:*,http://127.0.0.1:*,http://[::1]:*"
    assert load(GatewaySettings).allowed_origins == f"http://127.0.0.1:8000,{local}"
    monkeypatch.setenv("LONGHAUL_API_HOST", "console.example.com")
    monkeypatch.setenv("LONGHAUL_API_PORT", "80")
    assert load(GatewaySettings).allowed_origins == f"http://console.example.com,{local}"
    monkeypatch.setenv("LONGHAUL_API_PORT", " 8443 ")
    assert load(GatewaySettings).allowed_origins == f"http://console.example.com:8443,{local}"
    monkeypatch.setenv("LONGHAUL_ALLOWED_ORIGINS", "https://app.example.com")
    assert load(GatewaySettings).allowed_origins == "https://app.example.com"
    monkeypatch.setenv("LONGHAUL_ALLOWED_ORIGINS", "")
    assert load(GatewaySettings).allowed_origins == ""


def test_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    """LONGHAUL_<FIELD> overrides a field, with type conversion."""
    monkeypatch.setenv("LONGHAUL_NAMESPACE", "run_42")
    monkeypatch.setenv("LONGHAUL_IO_TIMEOUT_S", "2.5")
    monkeypatch.setenv("LONGHAUL_LOG_LEVEL", "debug")
    monkeypatch.setenv("LONGHAUL_WORKER_CONCURRENCY", "3")
    monkeypatch.setenv("LONGHAUL_RELAY_ENABLED", "false")
    s = load(WorkerSettings)
    assert (s.namespace, s.io_timeout_s, s.log_level) == ("run_42", 2.5, "DEBUG")
    assert s.worker_concurrency == 3
    assert s.relay_enabled is False


def test_unrelated_env_vars_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """A LONGHAUL_ variable another service reads does not break this one."""
    monkeypatch.setenv("LONGHAUL_GATEWAY_PORT", "9000")
    monkeypatch.setenv("LONGHAUL_SOMETHING_ELSE", "x")
    assert load(CommonSettings).namespace == "longhaul"


@pytest.mark.parametrize(
    ("env", "value", "cls"),
    [
        ("LONGHAUL_NAMESPACE", "Bad-Name", CommonSettings),
        ("LONGHAUL_NAMESPACE", "", CommonSettings),
        ("LONGHAUL_LOG_LEVEL", "chatty", CommonSettings),
        ("LONGHAUL_LOG_FORMAT", "xml", CommonSettings),
        ("LONGHAUL_IO_TIMEOUT_S", "0", CommonSettings),
        ("LONGHAUL_DELIVERY_LIMIT", "many", CommonSettings),
        ("LONGHAUL_API_PORT", "70000", ApiSettings),
        ("LONGHAUL_WORKER_CONCURRENCY", "0", WorkerSettings),
        ("LONGHAUL_RETRY_FACTOR", "0.5", WorkerSettings),
        # Each of these was a traceback, a retry until the start timeout, or a value
        # that broke at run time (an interval or an expiry out of range).
        ("LONGHAUL_REDIS_URL", "notaurl", CommonSettings),
        # redis-py took database 0 for it, without a word.
        ("LONGHAUL_REDIS_URL", "redis://127.0.0.1:6379/abc", CommonSettings),
        ("LONGHAUL_DATABASE_URL", "notaurl", CommonSettings),
        ("LONGHAUL_AMQP_URL", "http://127.0.0.1:5672/", CommonSettings),
        ("LONGHAUL_FAILPOINTS", "garbage", CommonSettings),
        ("LONGHAUL_LEASE_S", "inf", CommonSettings),
        ("LONGHAUL_CANCEL_GRACE_S", "nan", WorkerSettings),
        ("LONGHAUL_EVENT_RETENTION_S", "1e300", CommonSettings),
    ],
)
def test_bad_value_is_one_line_naming_the_env_var(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, cls: type[CommonSettings]
) -> None:
    """load() raises ConfigError with one line that names the LONGHAUL_ variable."""
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as info:
        load(cls)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"invalid configuration: {env}: ")


def test_several_bad_values_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """With several bad values the line names the first and counts the rest."""
    monkeypatch.setenv("LONGHAUL_NAMESPACE", "Bad-Name")
    monkeypatch.setenv("LONGHAUL_LOG_LEVEL", "chatty")
    with pytest.raises(ConfigError, match=r"\(and 1 more\)$"):
        load(CommonSettings)


def test_a_handoff_claim_shorter_than_three_io_timeouts_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A claim that could lapse during its own publish and deletion would publish
    tasks twice."""
    monkeypatch.setenv("LONGHAUL_IO_TIMEOUT_S", "10")
    monkeypatch.setenv("LONGHAUL_HANDOFF_CLAIM_S", "25")
    with pytest.raises(ConfigError, match=r"^invalid configuration: LONGHAUL_HANDOFF_CLAIM_S: "):
        load(ApiSettings)
    monkeypatch.setenv("LONGHAUL_HANDOFF_CLAIM_S", "30")
    assert load(ApiSettings).handoff_claim_s == 30


def test_no_origin_is_a_gateway_for_servers_alone_or_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An empty allow-list refuses every browser: fine for a gateway that only servers and
    SDKs (no Origin) use, an error when those are refused too (no client could connect)."""
    monkeypatch.setenv("LONGHAUL_ALLOWED_ORIGINS", " , ")
    assert load(GatewaySettings).allow_missing_origin
    monkeypatch.setenv("LONGHAUL_ALLOW_MISSING_ORIGIN", "false")
    with pytest.raises(ConfigError) as info:
        load(GatewaySettings)
    assert str(info.value).startswith("invalid configuration: LONGHAUL_ALLOWED_ORIGINS: ")
    assert "no client could connect" in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://events.example.com/v1/ws",  # a browser's WebSocket takes ws(s) only
        "events.example.com:8001/v1/ws",
        "ws:///v1/ws",
        "wss://user:secret@events.example.com/v1/ws",
        "wss://events.example.com/v1/ws#x",
    ],
)
def test_a_public_gateway_url_browsers_cannot_use_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    """Served to the console and put in its Content-Security-Policy: a URL that is no
    plain ws(s) URL would fail there, in the browser, far from its cause."""
    monkeypatch.setenv("LONGHAUL_PUBLIC_WS_URL", url)
    with pytest.raises(ConfigError, match="LONGHAUL_PUBLIC_WS_URL"):
        load(ApiSettings)


def test_back_pressure_below_the_brokers_guard_is_what_is_meant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At or above x-max-length, the broker refuses publishes of tasks already answered
    202 before the API refuses new ones: allowed (a drill), but said at start."""
    monkeypatch.setenv("LONGHAUL_QUEUE_MAX_LENGTH", "1000")
    monkeypatch.setenv("LONGHAUL_MAX_QUEUE_DEPTH", "999")
    assert load(ApiSettings).warnings() == []
    monkeypatch.setenv("LONGHAUL_MAX_QUEUE_DEPTH", "1000")
    (warning,) = load(ApiSettings).warnings()
    assert "LONGHAUL_MAX_QUEUE_DEPTH (1000)" in warning and "LONGHAUL_QUEUE_MAX_LENGTH" in warning


def test_a_lease_a_slow_database_could_let_lapse_is_warned_of(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load(WorkerSettings).warnings() == []  # 30 s against 2 x (5 + 1)
    monkeypatch.setenv("LONGHAUL_LEASE_S", "3")
    monkeypatch.setenv("LONGHAUL_IO_TIMEOUT_S", "3")
    (warning,) = load(WorkerSettings).warnings()
    assert warning.startswith("LONGHAUL_LEASE_S (3) is under twice LONGHAUL_IO_TIMEOUT_S")


def test_names_no_setting_reads_are_found_with_their_closest_known_name() -> None:
    env = {
        "LONGHAUL_WORKER_CONCURENCY": "64",  # a typo, close to a worker setting
        "longhaul_io_timout_s": "1",  # read in any case, so looked for in any case
        "LONGHAUL_ENTIRELY_NEW": "x",  # a later version's, say: no suggestion
        "LONGHAUL_MAX_QUEUE_DEPTH": "5",  # the API's: known to every service
        "LONGHAUL_GATEWAY_PORT": "1",
        "LONGHAUL_TEST_PG_URL": "x",  # the test suite's, make's, the benchmark's
        "LONGHAUL_BENCH_AMQP_URL": "x",
        "LONGHAUL_DEV_API_KEY": "x",
        "PATH": "/bin",
    }
    assert envnames.unknown_names(env) == [
        "LONGHAUL_ENTIRELY_NEW",
        "LONGHAUL_WORKER_CONCURENCY (LONGHAUL_WORKER_CONCURRENCY?)",
        "longhaul_io_timout_s (LONGHAUL_IO_TIMEOUT_S?)",
    ]
    assert envnames.warning({"LONGHAUL_GATEWAY_PORT": "1"}) is None


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379", "redis://127.0.0.1:6379/", "rediss://cache.example/15"]
)
def test_a_redis_url_may_name_its_database_by_number_or_not_at_all(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("LONGHAUL_REDIS_URL", url)
    assert load(CommonSettings).redis_url == url
