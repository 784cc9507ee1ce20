"""Validation of tenant and adapter names before they reach the filesystem or any lookup table.

Names become directory names in the store, so the rules are strict and ASCII-only: a name that
passes can never be a path separator trick ("..", "a/b"), a hidden-file dot name, or something that
looks the same as another name in a different Unicode normalization.
"""

from __future__ import annotations

import string

from loraserve.adapters.errors import AdapterValidationError

MAX_NAME_LENGTH = 64
"""Longest accepted name, in characters (all ASCII, so also bytes)."""

_FIRST_CHARS = frozenset(string.ascii_letters + string.digits)
_ALLOWED_CHARS = frozenset(string.ascii_letters + string.digits + "._-")


def _validate(name: object, what: str, field: str) -> str:
    """Return `name` unchanged if it is a safe name, else raise with the first problem found."""
    if not isinstance(name, str):
        raise AdapterValidationError(field, f"{what} name must be a string")
    if not name:
        raise AdapterValidationError(field, f"{what} name must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise AdapterValidationError(
            field, f"{what} name must be at most {MAX_NAME_LENGTH} characters (got {len(name)})"
        )
    if name in (".", ".."):
        raise AdapterValidationError(field, f"{what} name must not be {name!r}")
    # Check each character in order so the message names the first offending one; separators and
    # control characters get their own wording because they are the usual mistakes.
    for index, char in enumerate(name):
        if char in _ALLOWED_CHARS:
            continue
        if char in ("/", "\\"):
            raise AdapterValidationError(
                field, f"{what} name contains {char!r} at position {index}"
            )
        if not char.isascii():
            raise AdapterValidationError(
                field, f"{what} name contains a non-ASCII character at position {index}"
            )
        if ord(char) < 0x20 or ord(char) == 0x7F:
            raise AdapterValidationError(
                field, f"{what} name contains a control character at position {index}"
            )
        raise AdapterValidationError(
            field,
            f"{what} name contains {char!r} at position {index}; "
            "only letters, digits, '.', '_' and '-' are allowed",
        )
    if name[0] not in _FIRST_CHARS:
        raise AdapterValidationError(field, f"{what} name must start with a letter or digit")
    return name


def validate_adapter_name(name: str) -> str:
    """Return `name` if valid: 1-64 of [A-Za-z0-9._-], starting with a letter or digit."""
    return _validate(name, "adapter", "name")


def validate_tenant_name(name: str) -> str:
    """Return `name` if it is a valid tenant name (same rules as adapter names)."""
    return _validate(name, "tenant", "tenant")


def parse_versioned_name(spec: str) -> tuple[str, int | None]:
    """Splits `name@N` into (name, N); plain `name` gives (name, None). Both parts validated.

    The one place that reads the `@N` suffix (requests, Get/Delete/Pin of one version).
    """
    name, at, version = spec.partition("@") if isinstance(spec, str) else (spec, "", "")
    validate_adapter_name(name)
    if not at:
        return name, None
    if not version.isascii() or not version.isdigit() or int(version) < 1 or len(version) > 10:
        raise AdapterValidationError(
            "name", f"version after '@' must be a positive integer (got {version!r})"
        )
    return name, int(version)
