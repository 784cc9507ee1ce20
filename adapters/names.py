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


MAX_VERSION_DIGITS = 18
"""Longest version number accepted in `name@N` (the store's version directories allow as many)."""


def split_version(text: str, field: str = "name") -> tuple[str, int | None]:
    """Split `name@N` into (name, N), or plain `name` into (name, None); both parts validated.

    N must be a positive decimal integer written plainly: ASCII digits only, no sign, no leading
    zero, no spaces, at most MAX_VERSION_DIGITS digits. Anything else is refused (never guessed
    at), so "a@01" and "a@1" cannot name the same version in logs and caches under two spellings.
    """
    if not isinstance(text, str):
        raise AdapterValidationError(field, "adapter name must be a string")
    name, at, version_text = text.partition("@")
    _validate(name, "adapter", field)
    if not at:
        return name, None
    if not version_text:
        raise AdapterValidationError(field, "a version must follow '@' (name@N, N >= 1)")
    if not (version_text.isascii() and version_text.isdigit()):
        raise AdapterValidationError(
            field, "the version after '@' must be a decimal number >= 1 (digits only)"
        )
    if version_text[0] == "0":
        raise AdapterValidationError(
            field, "the version after '@' must be >= 1, written without leading zeros"
        )
    if len(version_text) > MAX_VERSION_DIGITS:
        raise AdapterValidationError(
            field, f"the version after '@' has more than {MAX_VERSION_DIGITS} digits"
        )
    return name, int(version_text)


def format_ref(name: str, version: int | None) -> str:
    """`name@N`, or `name` when no version is given (the inverse of split_version)."""
    return name if version is None else f"{name}@{version}"
