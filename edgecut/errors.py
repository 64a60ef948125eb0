"""One error hierarchy for the whole project.

Every error a user can cause or meet is an `EdgecutError` with a message written for that user.
The CLI prints it as one line and exits with `exit_code`; the gRPC servicer maps `grpc_status`
(a `grpc.StatusCode` member name, kept as a string so this module imports nothing heavy) to the
status of the one request that failed.
"""

from __future__ import annotations


class EdgecutError(Exception):
    """Base of every error edgecut raises on purpose."""

    exit_code = 1
    grpc_status = "INTERNAL"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(EdgecutError):
    """The command line or configuration asks for something impossible."""

    exit_code = 2
    grpc_status = "INVALID_ARGUMENT"


class DependencyError(EdgecutError):
    """An optional dependency is missing; the hint names the extra to install."""


class OnnxRuntimeMissing(DependencyError, ImportError):
    """No `onnxruntime` module: also an ImportError, so `except ImportError` code keeps working."""


class ModelLoadError(EdgecutError):
    """A model file or factory could not be loaded (missing, not ONNX, truncated, dynamic dims)."""


class PartitionError(EdgecutError):
    """The graph could not be cut or a segment could not be built."""


class VerificationError(PartitionError):
    """Chained segments disagree with the unsplit model beyond tolerance."""


class BundleError(EdgecutError):
    """A bundle is malformed: bad manifest, missing file, unsupported format version."""

    grpc_status = "FAILED_PRECONDITION"


class IntegrityError(BundleError):
    """A bundle file's hash or the manifest signature does not verify."""


class KeyFileError(EdgecutError):
    """A key file is missing, unreadable, of the wrong kind or too permissive."""


class CodecError(EdgecutError):
    """An encoded frame is malformed or disagrees with the cut's frontier spec."""

    grpc_status = "INVALID_ARGUMENT"


class FrameTooLargeError(CodecError):
    """A frame (or what it claims to decompress to) exceeds the configured limit."""

    grpc_status = "RESOURCE_EXHAUSTED"


class SealError(EdgecutError):
    """A sealed frame failed to open: wrong key, tampered bytes or wrong binding."""

    grpc_status = "UNAUTHENTICATED"


class ReplayError(SealError):
    """A frame's request id was seen before or its timestamp is outside the window."""


class UnknownKeyError(SealError):
    """A frame names a service key (key id) that this service does not hold (rotated out)."""


class NotFoundError(EdgecutError):
    """The model, version or cut a request names is not served."""

    grpc_status = "NOT_FOUND"


class OverloadedError(EdgecutError):
    """A bounded queue is full; the caller should back off or run locally."""

    grpc_status = "RESOURCE_EXHAUSTED"


class AuthError(EdgecutError):
    """The caller did not prove its identity (missing or unknown device token)."""

    grpc_status = "UNAUTHENTICATED"


class ForbiddenError(EdgecutError):
    """The caller is known but may not use this model."""

    grpc_status = "PERMISSION_DENIED"


class DeadlineError(EdgecutError):
    """The request's deadline passed before it could be computed."""

    grpc_status = "DEADLINE_EXCEEDED"


class RemoteError(EdgecutError):
    """The tail service answered a request with a non-OK status."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"tail service: {status}: {message}")
        self.status = status


class UnavailableError(EdgecutError):
    """The tail service cannot be reached."""

    grpc_status = "UNAVAILABLE"


class AddressInUseError(EdgecutError):
    """A port the service should listen on is taken (or cannot be bound at all)."""

    grpc_status = "UNAVAILABLE"


class RequestCancelledError(EdgecutError):
    """The edge gave up on a request (a cancel frame); it is dropped, never computed."""

    grpc_status = "CANCELLED"


class ProfileError(EdgecutError):
    """A profile is missing, garbled, of an unsupported version, or lacks a needed timing."""

    grpc_status = "FAILED_PRECONDITION"


class PlanError(EdgecutError):
    """No (cut, codec) option satisfies the constraints, or there are no options at all."""

    grpc_status = "FAILED_PRECONDITION"


class ImageError(EdgecutError):
    """An input image cannot be read or decoded."""

    grpc_status = "INVALID_ARGUMENT"
