"""A rule of FHIR's JSON format that FHIR model libraries do not check, for every component that
accepts FHIR resources (records over gRPC, the FHIR gateway over REST): a string SHALL NOT hold a
code point below 32 but tab, CR and LF (FHIR R4 json.html#primitive). ``fhir.resources`` accepts
them (its string pattern `[ \\r\\n\\t\\S]+` lets any non-space through), so they are checked here.
"""

from __future__ import annotations

import re
from typing import Any

from medledger_runtime.errors import InvalidArgument

CONTROL_CHARACTER_RULE = "FHIR strings hold no control characters but tab, CR and LF"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def control_character_at(resource: dict[str, Any]) -> str | None:
    """The FHIRPath of the first string (value or name) holding a control character FHIR
    forbids, starting with the resource type (`Observation.code.text`); None when there is none.
    Walked without recursion: the resource's depth is the client's."""
    stack: list[tuple[str, Any]] = [(str(resource.get("resourceType")), resource)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if _CONTROL.search(value):
                return path
        elif isinstance(value, dict):
            for key, item in value.items():
                if _CONTROL.search(key):
                    return path
                stack.append((f"{path}.{key}", item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None


def check_strings(resource: dict[str, Any], field: str) -> None:
    """InvalidArgument when a string of `resource` (the request's `field`) holds a control
    character, naming it below the field (`content.code.text`)."""
    where = control_character_at(resource)
    if where is not None:
        raise InvalidArgument.field(
            field + where.removeprefix(str(resource.get("resourceType"))), CONTROL_CHARACTER_RULE
        )
