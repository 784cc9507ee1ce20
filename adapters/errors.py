"""Domain errors of the adapter layer; the gRPC layer maps each to one status code."""

from __future__ import annotations


class AdapterError(Exception):
    """Base class of every adapter-layer error."""


class AdapterValidationError(AdapterError):
    """The upload is malformed or does not fit the base model (INVALID_ARGUMENT).

    `field` names what is wrong, e.g. "adapter_config.json:use_dora" or
    "adapter_model.safetensors:base_model.model...q_proj.lora_A.weight".
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class AdapterNotFoundError(AdapterError):
    """No such adapter for this tenant (NOT_FOUND). Never says whether another tenant has it."""


class AdapterQuotaError(AdapterError):
    """The tenant's adapter quota (count or bytes) would be exceeded (RESOURCE_EXHAUSTED)."""


class AdapterTooLargeError(AdapterValidationError):
    """A declared or received size exceeds a configured bound (INVALID_ARGUMENT)."""


class AdapterUploadCancelledError(AdapterError):
    """The uploader went away (cancel, disconnect, deadline) before the commit (CANCELLED)."""


class AdapterCorruptError(AdapterError):
    """Stored adapter files no longer match the checksums recorded at upload (INTERNAL/DATA_LOSS).

    Not the tenant's fault: the disk changed under us. The message names the file at fault.
    """


def clip(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters, for tenant-chosen names put into error fields/messages.

    Messages travel back in gRPC status trailers (a few KiB at most), so never echo input whole.
    """
    return text if len(text) <= limit else text[: limit - 3] + "..."


def echo(value: object, limit: int = 120) -> str:
    """repr() of a tenant-supplied value for an error message, cut to `limit` characters."""
    return clip(repr(value), limit)
