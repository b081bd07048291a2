"""Errors a worker sees. Each carries the chief's error code (when there is one) and a sentence."""

from __future__ import annotations


class FederationError(RuntimeError):
    """The federation refused us or went away; ``code`` is the protocol error code, if any."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class AuthenticationError(FederationError):
    """Wrong token, or the chief could not prove it knows the token."""


class ModelMismatchError(FederationError, ValueError):
    """Our model's tensors differ in count, shape or dtype from the federation's."""


class ChiefUnreachable(FederationError, ConnectionError):
    """Could not reach (or reach again) the chief within the time allowed."""


def from_code(code: str, message: str) -> FederationError:
    cls = {"auth_failed": AuthenticationError, "spec_mismatch": ModelMismatchError}.get(
        code, FederationError)
    return cls(message, code)
