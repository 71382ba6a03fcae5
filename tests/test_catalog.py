"""Endpoint catalog: suffix rules on label boundaries, longest suffix wins, user files override."""

import re

import pytest

from observer import ObserverError
from observer.catalog import Catalog


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog()


@pytest.mark.parametrize(
    ("name", "service", "organization", "category"),
    [
        ("g.whatsapp.net", "WhatsApp", "Meta", "messaging"),
        ("mmg.whatsapp.net", "WhatsApp media", "Meta", "media-cdn"),
        ("media-fra3-1.cdn.whatsapp.net", "WhatsApp media", "Meta", "media-cdn"),
        ("scontent.xx.fbcdn.net", "Facebook CDN", "Meta", "media-cdn"),
        ("chat.signal.org", "Signal", "Signal Foundation", "messaging"),
        ("cdn2.signal.org", "Signal media", "Signal Foundation", "media-cdn"),
        ("venus.web.telegram.org", "Telegram", "Telegram", "messaging"),
        ("backup.googleapis.com", "Google Drive backup", "Google", "backup"),
        ("www.googleapis.com", "Google Play services", "Google", "os-telemetry"),
        ("oauth2.googleapis.com", "Google", "Google", "cloud"),
        ("p42-content.icloud-content.com", "iCloud backup", "Apple", "backup"),
        ("courier.push.apple.com", "Apple push", "Apple", "push"),
        ("v10.events.data.microsoft.com", "Microsoft telemetry", "Microsoft", "os-telemetry"),
        ("app-measurement.com", "Firebase telemetry", "Google", "analytics"),
        ("d1234.cloudfront.net", "Amazon CloudFront", "Amazon", "cdn"),
        ("G.WhatsApp.NET.", "WhatsApp", "Meta", "messaging"),
    ],
)
def test_names_match_by_suffix(catalog, name, service, organization, category):
    hit = catalog.match_name(name)
    assert hit is not None
    assert (hit.service, hit.organization, hit.category) == (service, organization, category)


@pytest.mark.parametrize(
    "name", ["evilwhatsapp.net", "whatsapp.net.evil.com", "example.org", "", None]
)
def test_no_match_across_label_boundaries(catalog, name):
    assert catalog.match_name(name) is None


def test_backups_are_flagged(catalog):
    assert catalog.match_name("backup.googleapis.com").is_backup
    assert not catalog.match_name("g.whatsapp.net").is_backup


def test_networks_name_unnamed_addresses(catalog):
    assert catalog.match_ip("157.240.3.52").organization == "Meta"
    assert catalog.match_ip("149.154.167.50").service == "Telegram"
    assert catalog.match_ip("2a03:2880:f003:c07::1").organization == "Meta"
    assert catalog.match_ip("192.0.2.1") is None
    assert catalog.match_ip("not-an-ip") is None
    # A name wins over the address block.
    assert catalog.match("backup.googleapis.com", "157.240.3.52").service == "Google Drive backup"


def test_user_catalog_overrides_and_extends(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text(
        "services:\n"
        "  - service: Lab exporter\n    organization: Acme\n    category: analytics\n"
        "    suffixes: [sync.example-analytics.net, whatsapp.net]\n"
    )
    catalog = Catalog([user])
    assert catalog.match_name("a.sync.example-analytics.net").organization == "Acme"
    assert catalog.match_name("g.whatsapp.net").service == "Lab exporter"
    assert catalog.match_name("mmg.whatsapp.net").service == "WhatsApp media"  # longer suffix


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("services: {}\n", "top-level 'services:' list"),
        ("services:\n  - organization: X\n", "needs a 'service' name"),
        ("services:\n  - service: X\n    category: spyware\n", "unknown category"),
        ("services:\n  - service: X\n    networks: [300.1.1.0/24]\n", "not an address block"),
        ("services: [\n", "not valid YAML"),
    ],
)
def test_bad_catalog_files(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ObserverError, match=words):
        Catalog([path])


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("services:\n  - service: X\n    suffixes: [a.example]\n    sufixes: [b.example]\n",
         "bad.yaml:4: services.0.sufixes: unknown key"),
        ("services:\n  - service: X\n    service: Y\n",
         "bad.yaml:3: services.0.service: key given"),
        ("services:\n  - service: X\n    networks: [10.0.0.0/8, 300.1.1.0/24]\n",
         "bad.yaml:3: services.0.networks.1"),
        ("services: &s [{service: X}]\nmore: [" + ", ".join(["*s"] * 80) + "]\n",
         "more than 64 aliases"),
    ],
)
def test_catalog_errors_name_file_line_and_key(tmp_path, text, where):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ObserverError, match=re.escape(where)):
        Catalog([path])


def test_latin1_catalog_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes("services:\n  - service: Café\n".encode("latin-1"))
    with pytest.raises(ObserverError, match=r"bad\.yaml:2: not UTF-8"):
        Catalog([path])
