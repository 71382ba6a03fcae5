"""YAML files people edit (lab config, scenarios): ``safe_load`` only, and the line of every key,
so that an error can say exactly where to look."""

from __future__ import annotations

from typing import Any

import yaml

from observer import ObserverError


def parse_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """The data of a YAML text, and dotted key paths (``devices.0.ips``) -> 1-based lines."""
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ObserverError(f"{where}: not valid YAML: {problem}") from None
    return data, _key_lines(node) if node is not None else {}


def _key_lines(node: yaml.Node, path: str = "", out: dict[str, int] | None = None) -> dict:
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = f"{path}.{key.value}" if path else str(key.value)
            out[child] = key.start_mark.line + 1
            _key_lines(value, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _key_lines(item, f"{path}.{i}" if path else str(i), out)
    return out


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
