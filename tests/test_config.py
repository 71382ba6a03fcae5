"""Lab config: valid files load; each kind of mistake gives one line naming file, line and key."""

import ipaddress
import math
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from observer import ObserverError
from observer.cli import main
from observer.config import load_config

EXAMPLE = Path(__file__).parents[1] / "docs" / "lab.example.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lab.yaml"
    path.write_text(text)
    return path


def test_example_config_loads():
    config = load_config(EXAMPLE)
    assert config.timezone == "Europe/Berlin"
    assert [d.name for d in config.devices] == ["pixel7", "iphone13"]
    assert config.device_of("fd00:50::23") == "pixel7"
    assert config.device_of("10.0.0.1") is None
    assert config.thresholds.alpha == 0.01


def test_empty_file_gives_defaults(tmp_path):
    config = load_config(write(tmp_path, ""))
    assert config.timezone == "UTC" and config.bin_seconds == 10 and config.devices == ()


@pytest.mark.parametrize(
    ("text", "where", "words"),
    [
        ("timezone: Mars/Olympus\n", "lab.yaml:1: timezone", "unknown time zone"),
        ("bin_seconds: 10\nbin_secnds: 5\n", "lab.yaml:2: bin_secnds", "unknown key"),
        ("bin_seconds: -5\n", "lab.yaml:1: bin_seconds", "above 0"),
        ("bin_seconds: ten\n", "lab.yaml:1: bin_seconds", "must be a number"),
        ("devices:\n  - name: a\n    ips: [10.0.0.300]\n", "lab.yaml:3: devices.0.ips.0",
         "not an IPv4 or IPv6"),
        ("devices:\n  - name: a\n    macs: [zz]\n", "lab.yaml:3: devices.0.macs.0", "not a MAC"),
        ("devices:\n  - name: a\n", "lab.yaml:2: devices.0", "at least one IP or MAC"),
        ("devices:\n  - name: a\n    ips: [10.0.0.1]\n  - name: a\n    ips: [10.0.0.2]\n",
         "lab.yaml:4: devices.1.name", "listed twice"),
        ("devices:\n  - name: '<script>'\n    ips: [10.0.0.1]\n", "lab.yaml:2: devices.0.name",
         "needs a name"),
        ("devices: {a: 1}\n", "lab.yaml:1: devices", "must be a list"),
        ("analysis:\n  alpha: 2\n", "lab.yaml:2: analysis.alpha", "below 1"),
        ("analysis:\n  alfa: 0.1\n", "lab.yaml:2: analysis.alfa", "unknown key"),
        ("redact_query: maybe\n", "lab.yaml:1: redact_query", "true or false"),
        ("catalogs: [missing.yaml]\n", "lab.yaml:1: catalogs.0", "does not exist"),
        ("devices: [\n", "lab.yaml:2", "not valid YAML"),
        ("- just\n- a list\n", "lab.yaml", "must be a mapping"),
    ],
)
def test_config_errors_name_file_line_and_key(tmp_path, text, where, words):
    with pytest.raises(ObserverError) as err:
        load_config(write(tmp_path, text))
    message = str(err.value)
    assert where in message and words in message
    assert "\n" not in message


def test_python_tags_are_refused(tmp_path):
    """safe_load only: a YAML tag that would construct Python objects is an error, not code."""
    path = write(tmp_path, "timezone: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ObserverError, match="not valid YAML"):
        load_config(path)


def test_config_check_command(tmp_path, capsys):
    assert main(["config", "check", str(EXAMPLE)]) == 0
    assert "ok" in capsys.readouterr().out
    bad = write(tmp_path, "timezone: Nowhere/Land\n")
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lab.yaml:1: timezone" in err


def _refused_quickly(path: Path, words: str) -> str:
    start = time.perf_counter()
    with pytest.raises(ObserverError, match=words) as err:
        load_config(path)
    assert time.perf_counter() - start < 0.5
    assert "\n" not in str(err.value)
    return str(err.value)


LAUGHS = "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10)
)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (LAUGHS, "more than 64 aliases"),  # billion laughs: 9**10 values if expanded
        # few aliases, still 1000 * 8**5 values when expanded
        ("a0: &a0 [" + ", ".join(["x"] * 1000) + "]\n" + "".join(
            f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 8)}]\n" for i in range(1, 6)),
         "expands to more than"),
        ("a: &a [*a]\n", "refers to the value that contains it|not valid YAML"),
        ("x: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested deeper than 40|nesting depth"),
        ("".join("  " * i + "k:\n" for i in range(200)), "nested deeper than 40"),
        ("timezone: UTC\nbin_seconds: 5\ntimezone: Europe/Berlin\n",
         "lab.yaml:3: timezone: key given"),
        ("devices:\n  - {name: a, ips: [10.0.0.1], name: b}\n", "lab.yaml:2: devices.0.name: key"),
        ("bin_seconds: .inf\n", "lab.yaml:1: bin_seconds: must be a finite number"),
        ("analysis:\n  alpha: .nan\n", "lab.yaml:2: analysis.alpha: must be a finite number"),
        ("devices:\n  - name: a\n    ips: [-.inf]\n", "lab.yaml:3: devices.0.ips.0: must be a fin"),
        ("bin_seconds: 1e999\n", "must be a number"),  # YAML 1.1 reads it as text, not a float
        ("bin_seconds: 1.0e+999\n", "must be a finite number"),
        ("bin_seconds: 1" + "0" * 5000 + "\n", "not valid YAML"),
        ("timezone: 2026-02-30\n", "not valid YAML"),
    ],
)
def test_hostile_yaml_is_refused_quickly(tmp_path, text, words):
    _refused_quickly(write(tmp_path, text), words)


def test_latin1_file_names_line_and_byte(tmp_path):
    path = tmp_path / "lab.yaml"
    path.write_bytes("# lab\ntimezone: Europe/Zürich\n".encode("latin-1"))
    message = _refused_quickly(path, "not UTF-8")
    assert "lab.yaml:2:" in message and "0xfc" in message


def test_oversized_file_is_refused_unread(tmp_path):
    path = write(tmp_path, "# padding\n" * 300_000)
    _refused_quickly(path, "larger than 2 MiB")


def test_utf8_bom_and_merge_keys_are_accepted(tmp_path):
    path = tmp_path / "lab.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + b"timezone: Europe/Berlin\n")
    assert load_config(path).timezone == "Europe/Berlin"
    path.write_text("devices:\n  - name: a\n    <<: {ips: [10.0.0.1]}\n")
    assert load_config(path).devices[0].ips == ("10.0.0.1",)


# Property tests: whatever the YAML holds, the checker answers with a config or one clear line.

TMP_OK = [HealthCheck.function_scoped_fixture]  # tmp_path is rewritten each example
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["UTC", "Europe/Berlin", "10.0.0.1", "aa:bb:cc:dd:ee:ff"]),
)
KEYS = st.sampled_from(
    ["timezone", "bin_seconds", "udp_idle_timeout_s", "redact_query", "devices", "catalogs",
     "analysis", "name", "ips", "macs", "alpha", "min_occurrences", "merge_gap_s", "other"]
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=TMP_OK)
@given(data=st.dictionaries(KEYS, VALUES, max_size=7) | VALUES)
def test_any_yaml_gives_a_config_or_one_line(tmp_path, data):
    path = write(tmp_path, yaml.safe_dump(data, allow_unicode=True))
    try:
        config = load_config(path)
    except ObserverError as err:
        assert "\n" not in str(err) and "lab.yaml" in str(err)
        return
    assert all(math.isfinite(v) and v > 0 for v in (config.bin_seconds, config.udp_idle_timeout_s))
    assert 0 < config.thresholds.alpha < 1


@settings(max_examples=300, deadline=None, suppress_health_check=TMP_OK)
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_give_a_config_or_one_line(tmp_path, raw):
    path = tmp_path / "lab.yaml"
    path.write_bytes(raw)
    try:
        load_config(path)
    except ObserverError as err:
        assert "\n" not in str(err)


DEVICES = st.lists(
    st.tuples(
        st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,20}\Z"),
        st.lists(st.ip_addresses().map(str), min_size=1, max_size=3),
    ),
    max_size=4, unique_by=lambda d: d[0],
)


@settings(max_examples=150, deadline=None, suppress_health_check=TMP_OK)
@given(devices=DEVICES, bin_seconds=st.floats(0.001, 1e6), alpha=st.floats(1e-9, 0.999),
       redact=st.booleans())
def test_valid_configs_round_trip(tmp_path, devices, bin_seconds, alpha, redact):
    data = {"bin_seconds": bin_seconds, "redact_query": redact, "analysis": {"alpha": alpha},
            "devices": [{"name": name, "ips": ips} for name, ips in devices]}
    config = load_config(write(tmp_path, yaml.safe_dump(data)))
    assert config.bin_seconds == bin_seconds and config.thresholds.alpha == alpha
    assert config.redact_query is redact
    assert [(d.name, list(d.ips)) for d in config.devices] == [
        (name, [str(ipaddress.ip_address(ip)) for ip in ips]) for name, ips in devices]


def test_time_window_is_configurable(tmp_path):
    config = load_config(write(tmp_path, "time_window:\n  earliest: 2020-01-01\n  ahead_s: 60\n"))
    earliest, latest = config.time_window.bounds()
    assert earliest == 1_577_836_800.0 and time.time() < latest <= time.time() + 60
    assert load_config(write(tmp_path, "")).time_window.earliest == 788_918_400.0  # 1995
    with pytest.raises(ObserverError, match=r"yaml:2: time_window\.ahead_s: must be at least 0"):
        load_config(write(tmp_path, "time_window:\n  ahead_s: -5\n"))
    with pytest.raises(ObserverError, match=r"yaml:2: time_window\.earliest: must be a number"):
        load_config(write(tmp_path, "time_window:\n  earliest: yesterday\n"))


def test_config_check_refuses_a_hostile_catalog_in_one_line(tmp_path, capsys):
    (tmp_path / "mine.yaml").write_text(LAUGHS.replace("a0:", "services: []\na0:", 1))
    path = write(tmp_path, "catalogs: [mine.yaml]\n")
    start = time.perf_counter()
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert time.perf_counter() - start < 1.0
    assert err.count("\n") == 0 and "mine.yaml:10: more than 64 aliases" in err
