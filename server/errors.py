"""The server's exception tree; :mod:`server.api.errors` maps it to HTTP in one place.

::

    ServiceError                    (HTTP status in brackets)
    ├── BadRequestError             [400] malformed input
    │   └── InvalidUploadError      [422] an uploaded model or diff failed validation
    ├── AuthenticationError         [401] no or unknown credential
    ├── PermissionDeniedError       [403] a credential without the right scope or owner
    ├── NotFoundError               [404] unknown model, version, device, blob
    ├── ConflictError               [409] the request contradicts the current state
    ├── PayloadTooLargeError        [413] an upload over the size cap
    └── BlobStoreError              [503] the blob store failed or cannot be reached
"""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequestError(ServiceError):
    status_code = 400
    code = "bad_request"


class InvalidUploadError(BadRequestError):
    status_code = 422
    code = "invalid_upload"


class AuthenticationError(ServiceError):
    status_code = 401
    code = "unauthenticated"


class PermissionDeniedError(ServiceError):
    status_code = 403
    code = "forbidden"


class NotFoundError(ServiceError):
    status_code = 404
    code = "not_found"


class ConflictError(ServiceError):
    status_code = 409
    code = "conflict"


class PayloadTooLargeError(ServiceError):
    status_code = 413
    code = "payload_too_large"


class BlobStoreError(ServiceError):
    """The blob store failed or cannot be reached; the request may succeed if retried."""

    status_code = 503
    code = "blob_store_unavailable"
