"""OpenAI-style errors: every failure a client sees is ``{"error": {...}}`` with a status.

Clients (the ``openai`` package among them) read ``message``, ``type``, ``param``
and ``code`` from the body to build their exception, so every error path of the
server, validation and crashes included, answers in this one shape.
"""

from typing import Optional

from pydantic import ValidationError
from starlette.responses import JSONResponse


class APIError(Exception):
    """A request the server refuses or could not serve, with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
    ):
        super().__init__(message)
        self.status, self.message = status, message
        self.type, self.param, self.code = type, param, code

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def invalid(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    """A 400 for a request whose content is wrong."""
    return APIError(400, message, param=param, code=code)


def from_validation(error: ValidationError) -> APIError:
    """The first pydantic complaint as a 400 naming the field, e.g. ``messages.0.role``."""
    first = error.errors(include_url=False)[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    where = f"'{param}': " if param else ""
    return invalid(f"Invalid request: {where}{first['msg']}.", param=param, code="invalid_value")


def server_error(exc: BaseException) -> APIError:
    """A 500 for a failure inside the server; the server keeps running."""
    return APIError(
        500, f"The server failed on this request: {type(exc).__name__}: {exc}", type="server_error"
    )
