"""Lab config: valid files load; each kind of mistake gives one line naming file, line and key."""

from pathlib import Path

import pytest

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
        ("bin_seconds: -5\n", "lab.yaml:1: bin_seconds", "greater than 0"),
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
