"""Configuration errors in the operator's words: ``file:line: key: problem``, all at once.

Input: the YAML node tree of the file (for lines) and the problems found while loading it —
duplicate keys, duplicate rule names, pydantic ``ValidationError``s and the loader's own checks.
:class:`Problems` collects them; :meth:`Problems.check` raises one :class:`ConfigError` listing
every problem, one per line, in line order (so an operator fixes a file in one pass).

Wording: pydantic's type errors are rewritten in the project's words, naming what was found,
e.g. ``policy.concurrency: expected an integer, got a string "4"``; messages of our own
validators (``expected host:port, got '2525'``) pass through as written. A location inside a rule
reads ``rules[<name>].when.subject`` (the rule's index when it has no usable name).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

Loc = tuple[int | str, ...]


class ConfigError(Exception):
    """A configuration problem; ``str()`` is the operator-facing message (file:line: key: why),
    one line per problem when there are several."""


def _found(value: object) -> str:
    """What the file holds, in YAML's terms: ``a string "4"``, ``an integer 4``, ``a list``."""
    if isinstance(value, bool):
        return f"a boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"an integer {value}"
    if isinstance(value, float):
        return f"a number {value}"
    if isinstance(value, str):
        return f"a string {json.dumps(value)}"
    if value is None:
        return "nothing (null)"
    return "a list" if isinstance(value, list | tuple) else "a mapping"


def _number(value: object) -> object:
    """``30.0`` → ``30`` (durations are floats once parsed; the file said ``30s`` or ``30``)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# pydantic error type → what was expected (the value found is appended).
_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "path_type": "a path (a string)",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
    "tuple_type": "a list",
}
_BOUNDS = {
    "greater_than": ("greater than", "gt"),
    "greater_than_equal": ("at least", "ge"),
    "less_than": ("less than", "lt"),
    "less_than_equal": ("at most", "le"),
}


def _message(err: ErrorDetails) -> str:
    kind, ctx = err["type"], err.get("ctx", {})
    got = _found(err["input"])
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {got}"
    if kind in _BOUNDS:
        words, key = _BOUNDS[kind]
        return f"must be {words} {_number(ctx[key])}, got {_number(err['input'])}"
    if kind == "literal_error":
        hint = " (YAML reads a bare on/off/yes/no as a boolean)" if _is_bool(err["input"]) else ""
        return f"expected {ctx['expected']}, got {got}{hint}"
    if kind == "missing":
        return "required, missing"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "too_short":
        return f"expected at least {ctx['min_length']} item(s)"
    return err["msg"].removeprefix("Value error, ")


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


class Problems:
    """Every problem of one file, each with its line; :meth:`check` raises them together."""

    def __init__(self, source: Path | None, root: yaml.Node | None) -> None:
        self.source, self.root = source, root
        self._found: dict[str, int] = {}  # text → line (a problem reported twice counts once)

    def add(self, loc: Loc, text: str, line: int | None = None) -> None:
        line = line if line is not None else _locate(self.root, loc)
        name = str(self.source) if self.source else "(defaults)"
        where = f"{name}:{line}" if line else name
        dotted = _dotted_rules(self.root, loc) or ".".join(str(p) for p in loc) or "(top level)"
        self._found.setdefault(f"{where}: {dotted}: {text}", line or 0)

    def add_validation(self, exc: ValidationError) -> None:
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not str(p).startswith("function-"))
            if err["type"] == "duplicate_rule_name":  # point at the second rule's name
                loc = ("rules", err.get("ctx", {})["index"], "name")
            self.add(loc, _message(err))

    def add_duplicates(self) -> None:
        """Duplicate keys anywhere, and rules sharing a name (found before validation, so they
        are reported with every other problem, not only once the rules are otherwise valid)."""
        _duplicate_keys(self, self.root, ())
        for index, item in enumerate(_rule_nodes(self.root)):
            for other in _rule_nodes(self.root)[:index]:
                name = _rule_name(item)
                if name is not None and name == _rule_name(other):
                    self.add(("rules", index, "name"), f"duplicate rule name '{name}'")
                    break

    def check(self) -> None:
        if self._found:
            ordered = sorted(self._found, key=lambda text: self._found[text])
            raise ConfigError("\n".join(ordered))


def _duplicate_keys(problems: Problems, node: yaml.Node | None, where: Loc) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value)
            if name in seen:
                problems.add((*where, name), "duplicate key", key.start_mark.line + 1)
            seen.add(name)
            _duplicate_keys(problems, value, (*where, name))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicate_keys(problems, item, (*where, i))


def _rule_nodes(root: yaml.Node | None) -> list[yaml.Node]:
    if not isinstance(root, yaml.MappingNode):
        return []
    rules = [v for k, v in root.value if k.value == "rules"]
    return list(rules[-1].value) if rules and isinstance(rules[-1], yaml.SequenceNode) else []


def _rule_name(item: yaml.Node | None) -> str | None:
    if not isinstance(item, yaml.MappingNode):
        return None
    names = [v.value for k, v in item.value if k.value == "name" and isinstance(v, yaml.ScalarNode)]
    return names[-1] if names and isinstance(names[-1], str) and names[-1] else None


def _locate(root: yaml.Node | None, loc: Loc) -> int | None:
    """The 1-based line of the deepest node along ``loc`` that exists in the YAML tree."""
    node: Any = root
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if str(k.value) == str(part)]
            if not match:
                break
            key, node = match[-1]  # YAML keeps the last of duplicate keys
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                break
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _dotted_rules(root: yaml.Node | None, loc: Loc) -> str | None:
    """``rules[<name>].when.subject`` for a location inside a rule (its index without a name)."""
    if len(loc) < 2 or loc[0] != "rules" or not isinstance(loc[1], int):
        return None
    nodes = _rule_nodes(root)
    name = _rule_name(nodes[loc[1]]) if loc[1] < len(nodes) else None
    return ".".join([f"rules[{name or loc[1]}]", *(str(p) for p in loc[2:])])
