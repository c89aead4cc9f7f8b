"""The rule grammar: the ``rules:`` list of the configuration file, parsed and validated once.

Part of the configuration language (the policy service evaluates rules, ``services.policy.decide``;
it does not define them). Input: the YAML data under ``rules:`` (a list of mappings), validated as
part of :func:`services.common.config.load_config` (``Config.rules`` is ``tuple[Rule, ...]``)::

    - name: confidential                   # the circumstance's name (traces, metrics)
      when:                                # a condition (all keys must hold)
        any:
          - subject: "(?i)\\bconfidential\\b"
          - attachment: {filename: "*.xlsx"}
      unless: {sender_domain: newsletter.example.com}
      tls: enforced                        # none | opportunistic | enforced | verified
      route: 127.0.0.1:2700                # or {address: "host:port", tls_name: NAME}

Conditions: ``recipient_domain``, ``recipient``, ``sender``, ``sender_domain`` (globs, one string
or a list, case-insensitive), ``subject`` and ``body`` (regex, searched), ``header`` ({name,
matches}), ``attachment`` ({filename, content_type} globs), ``size_over`` (bytes), ``requiretls``
(bool), and the combinators ``any``/``all`` (lists) and ``not`` (a mapping). Regexes are compiled
here, globs lower-cased here, routes parsed here; evaluating a rule (``services.policy.decide``)
never fails.

Failure: pydantic ``ValidationError`` with the offending location (``rules.3.when.any.0.subject``)
and a message such as ``bad regex '(?i': missing -, : or ) at position 3``;
``load_config`` turns it into a ``ConfigError`` naming the file, line and rule.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from services.common.model import TlsMode
from services.common.values import Route, compile_regex, parse_route

# Circumstances that platform policy (not a rule) records; a rule may not take these names.
RESERVED_NAMES = frozenset({"default", "requiretls", "intra-platform", "mta-sts", "dane"})
CONTENT_KEYS = frozenset({"subject", "header", "body", "attachment"})
_RULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 §3.6.8: printable ASCII except ':'


# --------------------------------------------------------------------------- value types


def _globs(value: object) -> object:
    """A single string where a list is expected is a list of one."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list | tuple):
        raise ValueError(f"expected a glob or a list of globs, got {value!r}")
    return value


def _lower_globs(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value or any(not g.strip() for g in value):
        raise ValueError("expected a non-empty glob or list of non-empty globs")
    return tuple(g.strip().lower().rstrip(".") for g in value)


Regex = Annotated[
    re.Pattern[str],
    PlainValidator(compile_regex),
    PlainSerializer(lambda p: p.pattern, return_type=str),
]
Globs = Annotated[tuple[str, ...], BeforeValidator(_globs), AfterValidator(_lower_globs)]


def _tls_mode(value: object) -> TlsMode:
    if isinstance(value, TlsMode):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected none, opportunistic, enforced or verified, got {value!r}")
    return TlsMode.parse(value)


def _route_document(route: Route) -> dict[str, str | None]:
    """A rule's route in the configuration's JSON form (``config.dump_summary``): address text."""
    return {"address": str(route.address), "tls_name": route.tls_name}


Mode = Annotated[TlsMode, BeforeValidator(_tls_mode), PlainSerializer(lambda m: m.label)]
RouteOverride = Annotated[Route, PlainValidator(parse_route), PlainSerializer(_route_document)]


# --------------------------------------------------------------------------- conditions


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, serialize_by_alias=True)


def _non_empty(value: tuple[Condition, ...]) -> tuple[Condition, ...]:
    if not value:
        raise ValueError("expected a non-empty list of conditions")
    return value


def _list_of_conditions(value: object) -> object:
    if not isinstance(value, list | tuple):
        raise ValueError("expected a list of conditions (mappings)")
    return value


Conditions = Annotated[
    tuple["Condition", ...], BeforeValidator(_list_of_conditions), AfterValidator(_non_empty)
]


class HeaderCondition(_Strict):
    """``header: {name: X-Classification, matches: REGEX}``: any header of that name matches."""

    name: str
    matches: Regex

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _HEADER_NAME.match(value):
            raise ValueError(f"not a header field name: {value!r}")
        return value


class AttachmentCondition(_Strict):
    """``attachment: {filename: GLOB, content_type: GLOB}``: one part matches both given globs."""

    filename: Globs | None = None
    content_type: Globs | None = None

    @model_validator(mode="after")
    def _some(self) -> AttachmentCondition:
        if self.filename is None and self.content_type is None:
            raise ValueError("attachment needs filename and/or content_type")
        return self


class Condition(_Strict):
    """A condition mapping: every key given must hold. Fields are in evaluation order (cheap
    envelope facts first, the body last); ``any``/``all``/``not`` are the aliases of the
    combinator fields."""

    recipient_domain: Globs | None = None
    recipient: Globs | None = None
    sender: Globs | None = None
    sender_domain: Globs | None = None
    requiretls: StrictBool | None = None
    size_over: Annotated[StrictInt, Field(ge=0)] | None = None
    subject: Regex | None = None
    header: HeaderCondition | None = None
    attachment: AttachmentCondition | None = None
    body: Regex | None = None
    any_: Conditions | None = Field(None, alias="any")
    all_: Conditions | None = Field(None, alias="all")
    not_: Condition | None = Field(None, alias="not")

    @model_validator(mode="after")
    def _not_empty(self) -> Condition:
        if not any(True for _ in self.parts()):
            raise ValueError("a condition needs at least one key (recipient_domain, subject, ...)")
        return self

    def parts(self) -> Iterator[tuple[str, Any]]:
        """The keys given (as written in the file, e.g. ``any``) with their parsed values."""
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if value is not None:
                yield info.alias or name, value

    def keys(self) -> frozenset[str]:
        """Every key used here or in nested conditions."""
        found: set[str] = set()
        for key, value in self.parts():
            found.add(key)
            for child in _children(key, value):
                found |= child.keys()
        return frozenset(found)


def _children(key: str, value: Any) -> tuple[Condition, ...]:
    if key in ("any", "all"):
        return tuple(value)
    return (value,) if key == "not" else ()


# --------------------------------------------------------------------------- rules


class Rule(_Strict):
    """One rule: when ``when`` holds and ``unless`` (if given) does not, the rule matches."""

    name: str
    when: Condition
    unless: Condition | None = None
    tls: Mode | None = None
    route: RouteOverride | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _RULE_NAME.match(value):
            raise ValueError(f"rule name must be letters, digits, '.', '_', '-': {value!r}")
        if value.lower() in RESERVED_NAMES:
            raise ValueError(f"rule name {value!r} is reserved for platform policy")
        return value

    def keys(self) -> frozenset[str]:
        """Every condition key the rule uses (``when`` and ``unless``)."""
        return self.when.keys() | (self.unless.keys() if self.unless else frozenset())


def _rules(value: object) -> object:
    if value is None:
        return ()  # ``rules:`` with nothing under it
    if not isinstance(value, list | tuple):
        raise ValueError("expected a list of rules (each a mapping with name and when)")
    return value


def _unique_names(rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    seen: set[str] = set()
    for index, rule in enumerate(rules):
        if rule.name in seen:
            raise PydanticCustomError(
                "duplicate_rule_name",
                "duplicate rule name '{name}'",
                {"name": rule.name, "index": index},
            )
        seen.add(rule.name)
    return rules


# The type of ``Config.rules``. A duplicate name is reported with ``ctx["index"]`` of the second
# rule, which ``configerrors.Problems`` uses to point at its line (a duplicate is also found
# before validation, so it is reported with the other problems of the file).
Rules = Annotated[tuple[Rule, ...], BeforeValidator(_rules), AfterValidator(_unique_names)]


# --------------------------------------------------------------------------- summaries


def summarize(condition: Condition) -> str:
    """A one-line description, e.g. ``any(subject ~ /x/, sender_domain in [a.example])``."""
    return ", ".join(_summarize_part(key, value) for key, value in condition.parts())


def _summarize_part(key: str, value: Any) -> str:
    if key in ("any", "all"):
        return f"{key}({'; '.join(summarize(c) for c in value)})"
    if key == "not":
        return f"not({summarize(value)})"
    if isinstance(value, tuple):
        return f"{key} in [{', '.join(value)}]"
    if isinstance(value, re.Pattern):
        return f"{key} ~ /{value.pattern}/"
    if isinstance(value, HeaderCondition):
        return f"header {value.name} ~ /{value.matches.pattern}/"
    if isinstance(value, AttachmentCondition):
        return f"attachment {_attachment_text(value)}"
    if isinstance(value, bool):
        return f"{key} {str(value).lower()}"
    return f"{key} {value}"


def _attachment_text(value: AttachmentCondition) -> str:
    parts = []
    if value.filename:
        parts.append(f"filename [{', '.join(value.filename)}]")
    if value.content_type:
        parts.append(f"content_type [{', '.join(value.content_type)}]")
    return " and ".join(parts)
