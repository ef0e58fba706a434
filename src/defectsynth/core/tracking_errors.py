"""MLflow errors told apart: "that does not exist" is an answer; a store that fails to answer is an error.

Reading an absent alias or version is a normal case (no champion yet, finetune not run); a connection
refused, a timeout or a server error is not, and must never be read as "absent": that would move
``champion`` to a worse version or tell the user to re-run a fine-tune that exists. MLflow is imported
only where it is already loaded, so the command line starts without it.
"""

from __future__ import annotations

import sys
from typing import Any

from defectsynth.storage.redact import redact

_NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


class TrackingStoreError(RuntimeError):
    """The MLflow store failed to answer; the message names the store (credentials masked) and the action."""

    def __init__(self, action: str, error: Exception, store: str | None = None) -> None:
        if store is None:
            import mlflow

            store = mlflow.get_tracking_uri()
        self.store = redact(store)
        detail = getattr(error, "message", None) or str(error)
        super().__init__(f"MLflow store {self.store} failed while {action}: {redact(detail)}")

    def __reduce__(self) -> tuple:
        """Pickle as a plain RuntimeError with the message, so it crosses Ray's process boundaries."""
        return RuntimeError, (str(self),)


def is_mlflow_error(error: BaseException) -> bool:
    """Whether ``error`` is an ``MlflowException`` (False when MLflow was never imported: then it cannot be one)."""
    exceptions = sys.modules.get("mlflow.exceptions")
    return exceptions is not None and isinstance(error, exceptions.MlflowException)


def is_not_found(error: Any) -> bool:
    """Whether an ``MlflowException`` says the entity does not exist (SQL stores say so of a missing alias with 400)."""
    if error.error_code in _NOT_FOUND_CODES:
        return True
    return error.error_code == "INVALID_PARAMETER_VALUE" and error.message.rstrip(".").endswith("not found")
