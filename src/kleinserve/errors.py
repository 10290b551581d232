"""Every error kleinserve raises on purpose.

    KleinError                  base; carries an HTTP status and a machine-readable code
    ├── InvalidInput            a request value is wrong: names the parameter and what is allowed (400)
    │   └── UnknownModel        the request names a model this server does not serve (404)
    ├── PayloadTooLarge         the request body is over the size limit (413)
    ├── Unauthorized            no API key, or not a valid one (401)
    ├── Forbidden               a signed link is expired or tampered with (403)
    ├── NotFound                no such endpoint, media file, job or key (404)
    ├── MethodNotAllowed        the path exists, not for this HTTP method: names the `allowed` ones (405)
    ├── Conflict                the state forbids it: cancelling a finished job, a key name taken (409)
    ├── Overloaded              the wait queue is full; `retry_after` seconds (429)
    ├── Unavailable             the server is shutting down or not ready; `retry_after` seconds (503)
    │   └── StoreUnavailable    the job store cannot be read or written (locked, disk full) (503)
    ├── Cancelled               the caller cancelled the work between two denoising steps (499)
    ├── EngineError             the engine failed on a job (500)
    └── ModelLoadError          a model source cannot be used: names the file and what was expected (500)

Errors are raised, never returned. Each API dialect renders them once, in its own body; the CLI prints the
message and exits non-zero. Anything that is not a KleinError is a bug and surfaces as a 500.
"""

from __future__ import annotations


class KleinError(Exception):
    """Base class. `status` is the HTTP status a dialect answers with, `code` a stable machine name."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(KleinError):
    """A request value is out of range or malformed.

    `param` names the offending field in kleinserve's internal vocabulary (dialects may rename it);
    `allowed` says in words what would have been accepted.
    """

    status = 400
    code = "invalid_input"

    def __init__(self, message: str, *, param: str | None = None, allowed: str | None = None) -> None:
        super().__init__(f"{message} (allowed: {allowed})" if allowed else message)
        self.param = param
        self.allowed = allowed


class UnknownModel(InvalidInput):
    status = 404
    code = "model_not_found"


class PayloadTooLarge(KleinError):
    status = 413
    code = "payload_too_large"


class Unauthorized(KleinError):
    status = 401
    code = "unauthorized"


class Forbidden(KleinError):
    status = 403
    code = "forbidden"


class NotFound(KleinError):
    status = 404
    code = "not_found"


class MethodNotAllowed(KleinError):
    """The path is served, but not for the request's HTTP method; `allowed` are the methods it takes (the
    answer's `Allow` header)."""

    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, *, allowed: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allowed = allowed


class Conflict(KleinError):
    status = 409
    code = "conflict"


class Overloaded(KleinError):
    """Too much work is waiting; try again after `retry_after` seconds."""

    status = 429
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(Overloaded):
    status = 503
    code = "unavailable"


class StoreUnavailable(Unavailable):
    """The job store refused a read or write (another process holds its lock, the disk is full ...): the
    request was not accepted, and may be sent again."""

    code = "store_unavailable"


class Cancelled(KleinError):
    """Raised inside the engine at a step boundary when the work was cancelled."""

    status = 499
    code = "cancelled"


class EngineError(KleinError):
    """A job failed in the engine; the message is the job's stored error."""

    status = 500
    code = "engine_error"


class ModelLoadError(KleinError):
    """A model directory, file or repo id cannot be loaded; the message names the file and the expectation."""

    status = 500
    code = "model_load_error"
