"""What the server says when it refuses a request: one JSON shape for every error, a 4xx never a 5xx."""

from typing import Optional

from fastapi.responses import JSONResponse
from pydantic import BaseModel


class ApiError(Exception):
    """A request the server refuses: an HTTP status, a short type and a message saying what to do."""

    def __init__(self, status, kind, message):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


class ErrorBody(BaseModel):
    """Every error: what kind, what was wrong and what to do, and field details for validation errors."""

    error: str
    type: str
    details: Optional[list[dict]] = None


def error_response(status, kind, message, details=None):
    """The JSON response of an error: {"error": message, "type": kind, "details": field details or absent}."""
    body = {"error": message, "type": kind}
    if details is not None:
        body["details"] = details
    return JSONResponse(body, status_code=status)
