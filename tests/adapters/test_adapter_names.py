"""Tenant and adapter name rules: what passes, and the message for each kind of bad name."""

from __future__ import annotations

import re

import pytest

from loraserve.adapters.errors import AdapterValidationError
from loraserve.adapters.names import (
    format_ref,
    split_version,
    validate_adapter_name,
    validate_tenant_name,
)


@pytest.mark.parametrize(
    "name", ["a", "A", "0", "my-adapter", "v1.2_final", "x" * 64, "9lives", "a..b", "a.-_"]
)
def test_good_names_pass_unchanged(name: str) -> None:
    assert validate_adapter_name(name) == name
    assert validate_tenant_name(name) == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "must not be empty"),
        ("x" * 65, "must be at most 64 characters"),
        (".", "must not be '.'"),
        ("..", "must not be '..'"),
        (".hidden", "must start with a letter or digit"),
        ("-flag", "must start with a letter or digit"),
        ("_x", "must start with a letter or digit"),
        ("a/b", "contains '/'"),
        ("../etc", "contains '/'"),
        ("a\\b", "contains '\\\\'"),
        ("caf\u00e9", "contains a non-ASCII character"),
        ("\uff41", "contains a non-ASCII character"),  # fullwidth a
        ("a\x00b", "contains a control character"),
        ("a\nb", "contains a control character"),
        ("a\x7f", "contains a control character"),
        ("a b", "contains ' '"),
        ("a:b", "contains ':'"),
        ("a*", "contains '*'"),
    ],
)
def test_bad_adapter_names_are_refused_with_a_specific_message(name: str, message: str) -> None:
    with pytest.raises(AdapterValidationError) as info:
        validate_adapter_name(name)
    assert info.value.field == "name"
    assert message in info.value.message


def test_tenant_names_use_the_tenant_field() -> None:
    with pytest.raises(AdapterValidationError) as info:
        validate_tenant_name("a/b")
    assert info.value.field == "tenant"
    assert "tenant name contains '/'" in info.value.message


def test_non_string_is_refused() -> None:
    with pytest.raises(AdapterValidationError, match="must be a string"):
        validate_adapter_name(b"abc")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("bot", ("bot", None)), ("bot@1", ("bot", 1)), ("a.b-c_d@42", ("a.b-c_d", 42))],
)
def test_split_version_accepts_plain_names_and_positive_versions(
    text: str, expected: tuple[str, int | None]
) -> None:
    assert split_version(text) == expected
    assert format_ref(*expected) == text


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("bot@", "a version must follow"),
        ("bot@0", ">= 1, written without leading zeros"),
        ("bot@01", "without leading zeros"),
        ("bot@+1", "digits only"),
        ("bot@-1", "digits only"),
        ("bot@1.0", "digits only"),
        ("bot@ 1", "digits only"),
        ("bot@1 ", "digits only"),
        ("bot@1@2", "digits only"),
        ("bot@\u0661", "digits only"),  # an Arabic-Indic one: isdigit() but not ASCII
        ("bot@1e3", "digits only"),
        ("bot@" + "9" * 19, "more than 18 digits"),
        ("@1", "must not be empty"),
        ("b/t@1", "contains '/'"),
    ],
)
def test_split_version_refuses_every_other_spelling(text: str, problem: str) -> None:
    with pytest.raises(AdapterValidationError, match=re.escape(problem)) as info:
        split_version(text)
    assert info.value.field == "name"
    with pytest.raises(AdapterValidationError) as info:
        split_version(text, field="adapter")
    assert info.value.field == "adapter"
