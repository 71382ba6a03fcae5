"""YAML files people edit (lab config, endpoint catalogs, scenarios): one reader and one shape
checker, so that each kind of file gets the same limits and errors that cite file, line and key.

The reader constructs with ``SafeLoader`` only, and refuses before constructing anything a small
hostile file could make expensive: files over ``MAX_BYTES``, more than ``MAX_ALIASES`` aliases
(entity expansion, "billion laughs"), nesting deeper than ``MAX_DEPTH``, documents that expand to
more than ``MAX_NODES`` nodes, bytes that are not UTF-8, duplicate keys, and ``.inf``/``.nan``.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from observer import ObserverError

MAX_BYTES = 2 * 1024 * 1024
MAX_ALIASES = 64
MAX_DEPTH = 40
MAX_NODES = 200_000
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE = "tag:yaml.org,2002:merge"


@dataclass(frozen=True)
class YamlDocument:
    """The data of a YAML file, and dotted key paths (``devices.0.ips``) -> 1-based lines."""

    data: Any
    lines: dict[str, int]
    source: str

    def shape(self) -> Shape:
        return Shape(self.source, self.lines)


def read_yaml(path: str | Path, what: str = "file") -> YamlDocument:
    """Read and parse a YAML file with the limits above; ``what`` names it in errors."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ObserverError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise ObserverError(f"{path}: larger than {MAX_BYTES // 1024 // 1024} MiB; "
                            f"a {what} is a small hand-edited file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ObserverError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "save the file as UTF-8"
        ) from None
    data, lines = parse_yaml(text, str(path))
    return YamlDocument(data, lines, str(path))


def parse_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """The data of a YAML text and its key lines, after the limits and checks above."""
    if len(text) > MAX_BYTES:
        raise ObserverError(f"{source}: larger than {MAX_BYTES // 1024 // 1024} MiB")
    loader = _LOADER(text)
    try:
        _check_events(text, source)
        node = loader.get_single_node()
        if node is None:
            return None, {}
        _check_expansion(node, source)
        lines = _key_lines(node, source)
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ObserverError(f"{where}: not valid YAML: {problem}") from None
    except (ValueError, OverflowError) as exc:  # e.g. a date 2026-02-30, an int of 5000 digits
        raise ObserverError(f"{source}: not valid YAML: {str(exc).split(';')[0]}") from None
    finally:
        loader.dispose()
    _check_finite(data, "", source, lines)
    return data, lines


def _check_events(text: str, source: str) -> None:
    """Count aliases and nesting from the event stream, before any node is built."""
    depth = aliases = 0
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise ObserverError(f"{source}:{event.start_mark.line + 1}: nested deeper than "
                                    f"{MAX_DEPTH} levels")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        elif isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                raise ObserverError(f"{source}:{event.start_mark.line + 1}: more than "
                                    f"{MAX_ALIASES} aliases (*name); write the values out")


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Refuse a document whose aliases expand it beyond ``MAX_NODES`` values or ``MAX_DEPTH``
    levels, or refer to themselves; later walks over the data then stay small and shallow."""
    seen: dict[int, tuple[int, int] | None] = {}

    def measure(node: yaml.Node) -> tuple[int, int]:
        if id(node) in seen:
            known = seen[id(node)]
            if known is None:
                raise ObserverError(f"{source}:{node.start_mark.line + 1}: an alias refers to "
                                    "the value that contains it")
            return known
        seen[id(node)] = None
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        size, depth = 1, 0
        for child in children:
            child_size, child_depth = measure(child)
            size, depth = min(MAX_NODES + 1, size + child_size), max(depth, child_depth)
        if size > MAX_NODES:
            raise ObserverError(f"{source}: expands to more than {MAX_NODES} values "
                                "through aliases")
        if depth > MAX_DEPTH:
            raise ObserverError(f"{source}:{node.start_mark.line + 1}: nested deeper than "
                                f"{MAX_DEPTH} levels through aliases")
        seen[id(node)] = size, depth + 1
        return size, depth + 1

    measure(root)


def _key_lines(node: yaml.Node, source: str, path: str = "",
               out: dict[str, int] | None = None) -> dict[str, int]:
    """Dotted key paths -> lines; a key given twice in one mapping is an error."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if key.tag == _MERGE:
                _key_lines(value, source, path, out)
                continue
            name = str(key.value)
            child = f"{path}.{name}" if path else name
            if isinstance(key, yaml.ScalarNode) and name in seen:
                raise ObserverError(f"{source}:{key.start_mark.line + 1}: {child}: "
                                    "key given twice; keep one")
            seen.add(name)
            out[child] = key.start_mark.line + 1
            _key_lines(value, source, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _key_lines(item, source, f"{path}.{i}" if path else str(i), out)
    return out


def _check_finite(value: Any, path: str, source: str, lines: dict[str, int]) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise located_error(source, lines, path or "(top level)",
                            f"must be a finite number, not {value}")
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    for key, item in items:
        _check_finite(item, f"{path}.{key}" if path else str(key), source, lines)


def located_error(source: str, lines: dict[str, int], key: str, message: str) -> ObserverError:
    """``file:line: key: message``, with the line of the key or of its nearest parent."""
    line, probe = None, key
    while probe:
        line = lines.get(probe)
        if line is not None or "." not in probe:
            break
        probe = probe.rsplit(".", 1)[0]
    where = f"{source}:{line}" if line else source
    return ObserverError(f"{where}: {key}: {message}")


class Shape:
    """Typed reads from parsed YAML; each failure names the file, the line and the dotted key.

    ``data`` is the mapping being read, ``key`` its entry and ``prefix`` the dotted path of
    ``data`` itself (``"devices.0."``), so that errors can cite the full key.
    """

    def __init__(self, source: str, lines: dict[str, int]) -> None:
        self.source = source
        self.lines = lines

    def fail(self, key: str, message: str) -> ObserverError:
        return located_error(self.source, self.lines, key or "(top level)", message)

    def mapping(self, value: Any, key: str, known: set[str] | None = None) -> dict:
        """A mapping (``None`` reads as empty) whose keys, if ``known`` is given, are all known."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a mapping of keys to values, not {type(value).__name__}")
        prefix = f"{key}." if key else ""
        for name in value:
            if known is not None and name not in known:
                raise self.fail(f"{prefix}{name}",
                                f"unknown key (known keys: {', '.join(sorted(known))})")
        return value

    def sequence(self, data: dict, key: str, prefix: str, what: str) -> list:
        """A list (missing or empty reads as ``[]``); ``what`` says what its items are."""
        value = data.get(key) or []
        if not isinstance(value, list):
            raise self.fail(f"{prefix}{key}", f"must be a list of {what}")
        return value

    def number(self, data: dict, key: str, prefix: str, default: Any, *, low: float | None = None,
               high: float | None = None, strict: bool = False, integer: bool = False) -> Any:
        """A finite number within ``[low, high]`` (``strict``: above ``low``)."""
        if key not in data:
            return default
        value, full = data[key], f"{prefix}{key}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(full, f"must be a number, not {value!r}")
        if not math.isfinite(value):
            raise self.fail(full, f"must be a finite number, not {value}")
        if integer and value != int(value):
            raise self.fail(full, f"must be a whole number, not {value!r}")
        if low is not None and (value < low or (strict and value == low)):
            raise self.fail(full, f"must be {'above' if strict else 'at least'} {low}, not {value}")
        if high is not None and value > high:
            raise self.fail(full, f"must be at most {high}, not {value}")
        return int(value) if integer else value

    def string(self, data: dict, key: str, prefix: str, default: str,
               choices: tuple[str, ...] = ()) -> str:
        """A non-empty text value, stripped; one of ``choices`` if given."""
        if key not in data:
            return default
        value = data[key]
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"{prefix}{key}", f"must be a text value, not {value!r}")
        if choices and value not in choices:
            raise self.fail(f"{prefix}{key}", f"must be one of {', '.join(choices)}, not {value!r}")
        return value.strip()

    def boolean(self, data: dict, key: str, prefix: str, default: bool) -> bool:
        value = data.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(f"{prefix}{key}", f"must be true or false, not {value!r}")
        return value

    def ip(self, data: dict, key: str, prefix: str, default: str | None = None,
           version: int | None = None) -> str:
        return self.ip_value(data.get(key, default), f"{prefix}{key}", version)

    def ip_value(self, value: Any, key: str, version: int | None = None) -> str:
        """An IP address in its normal form; ``version`` 4 or 6 to require one."""
        try:
            addr = ipaddress.ip_address(str(value))
        except ValueError:
            addr = None
        if addr is None or (version is not None and addr.version != version):
            kind = f"IPv{version}" if version else "IPv4 or IPv6"
            raise self.fail(key, f"{value!r} is not an {kind} address")
        return str(addr)

    def mac(self, data: dict, key: str, prefix: str, default: str | None = None) -> str:
        return self.mac_value(data.get(key, default), f"{prefix}{key}")

    def mac_value(self, value: Any, key: str) -> str:
        """A MAC address, lower case."""
        if not isinstance(value, str) or not MAC.match(value.lower()):
            raise self.fail(key, f"{value!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
        return value.lower()
