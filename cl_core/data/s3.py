"""S3 settings from the environment contract and a boto3 client that fails fast and clearly.

The pipeline talks to S3 (SeaweedFS locally; AWS S3, MinIO, ... in production) only through a client made here, so
every caller gets the same retry policy and the same error when the endpoint is down: `S3Unavailable`, naming the
endpoint and the variable to check, instead of a botocore traceback after minutes of default retries.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from cl_core.errors import ContinualError

DEFAULT_ENDPOINT = "http://127.0.0.1:8333"
DEFAULT_BUCKET = "cl-experiences"
DEFAULT_REGION = "us-east-1"


class S3Error(ContinualError):
    """An S3 request failed for a reason the caller can fix (credentials, bucket, permissions)."""


class S3Unavailable(S3Error, ConnectionError):
    """The S3 endpoint did not answer (refused, timed out, dropped) after the client's retries.

    A `ConnectionError`, so orchestrators that retry on connection errors (Prefect task retries) treat it as
    transient."""


@dataclass(frozen=True)
class S3Settings:
    """Where experiences live and how to reach them.

    `endpoint_url=None` means AWS's own endpoint for `region`. `prefix` is normalised to "" or a string ending in
    "/" (leading "/" dropped), so keys are always `prefix + "experiences/..."`. Keys `None` defer to boto3's
    credential chain (environment, profile, instance role).
    """

    endpoint_url: str | None = DEFAULT_ENDPOINT
    bucket: str = DEFAULT_BUCKET
    prefix: str = ""
    region: str = DEFAULT_REGION
    access_key_id: str | None = None
    secret_access_key: str | None = None
    connect_timeout: float = 2.0
    read_timeout: float = 10.0
    max_attempts: int = 3  # per request, the first included: a refused endpoint fails in well under a second,
    # one that drops packets in about max_attempts * connect_timeout plus backoff

    def __post_init__(self) -> None:
        if not self.bucket or "/" in self.bucket:
            raise S3Error(f"S3 bucket name {self.bucket!r} is invalid: set CL_S3_BUCKET to a bucket name "
                          "(no '/'; put sub-paths in CL_S3_PREFIX)")
        prefix = self.prefix.lstrip("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        object.__setattr__(self, "prefix", prefix)
        if self.endpoint_url is not None and not self.endpoint_url.startswith(("http://", "https://")):
            raise S3Error(f"S3 endpoint {self.endpoint_url!r} is not a URL: set CL_S3_ENDPOINT to "
                          "http(s)://host:port (or to an empty string for AWS S3)")
        if self.max_attempts < 1 or self.connect_timeout <= 0 or self.read_timeout <= 0:
            raise S3Error("S3 client limits must be positive: max_attempts >= 1, connect/read timeouts > 0 "
                          f"(got {self.max_attempts}, {self.connect_timeout}, {self.read_timeout})")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> S3Settings:
        """Settings from the environment contract: `CL_S3_ENDPOINT` (empty = AWS), `CL_S3_BUCKET`,
        `CL_S3_PREFIX`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            "endpoint_url": env.get("CL_S3_ENDPOINT", DEFAULT_ENDPOINT) or None,
            "bucket": env.get("CL_S3_BUCKET", DEFAULT_BUCKET),
            "prefix": env.get("CL_S3_PREFIX", ""),
            "region": env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or DEFAULT_REGION,
            "access_key_id": env.get("AWS_ACCESS_KEY_ID") or None,
            "secret_access_key": env.get("AWS_SECRET_ACCESS_KEY") or None,
        }
        values.update(overrides)
        return cls(**values)

    @property
    def where(self) -> str:
        """The endpoint in words, for error messages."""
        return self.endpoint_url or f"AWS S3 ({self.region})"


_CONNECTION_ERRORS: tuple[type[BaseException], ...] | None = None


def _connection_errors() -> tuple[type[BaseException], ...]:
    global _CONNECTION_ERRORS
    if _CONNECTION_ERRORS is None:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        # EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError, ProxyConnectionError
        # all derive from these two.
        _CONNECTION_ERRORS = (BotoConnectionError, HTTPClientError)
    return _CONNECTION_ERRORS


def translate_error(exc: BaseException, settings: S3Settings) -> BaseException:
    """The error to raise for a failed request: `S3Unavailable` / `S3Error` for what the settings can fix,
    the original exception otherwise (e.g. `ClientError` for a missing key, which callers handle)."""
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    if isinstance(exc, S3Error):
        return exc
    if isinstance(exc, _connection_errors()):
        return S3Unavailable(
            f"S3 endpoint {settings.where} is unreachable after {settings.max_attempts} attempt(s): {exc}. "
            "Check that the S3 service is running (locally: `python -m cl_core.stack up`) and that "
            "CL_S3_ENDPOINT points at it.")
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return S3Error(f"no usable S3 credentials for {settings.where}: {exc}. Set AWS_ACCESS_KEY_ID and "
                       "AWS_SECRET_ACCESS_KEY (any values for the local SeaweedFS, e.g. cl-local).")
    return exc


def make_client(settings: S3Settings | None = None) -> Any:
    """A boto3 S3 client: standard retry mode with `max_attempts`, short connect/read timeouts, path-style
    addressing (SeaweedFS and MinIO have no per-bucket DNS names).

    Transport failures surface as `S3Unavailable` from every operation, paginators included: a handler on
    botocore's `after-call-error` event (emitted once the retries are spent) raises it in place of the botocore
    error. The client stays a plain boto3 client, so any code can use it.
    """
    import boto3
    from botocore.config import Config

    settings = settings or S3Settings.from_env()
    config = Config(
        region_name=settings.region,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        retries={"mode": "standard", "total_max_attempts": settings.max_attempts},
        s3={"addressing_style": "path"},
    )
    client = boto3.client("s3", endpoint_url=settings.endpoint_url, aws_access_key_id=settings.access_key_id,
                          aws_secret_access_key=settings.secret_access_key, config=config)

    def _raise_clear(exception: BaseException, **_: Any) -> None:
        clear = translate_error(exception, settings)
        if clear is not exception:
            raise clear from exception

    client.meta.events.register("after-call-error.s3.*", _raise_clear)
    return client


def ensure_bucket(client: Any, settings: S3Settings) -> None:
    """Create the bucket when it does not exist (local stacks and tests; production buckets are provisioned)."""
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=settings.bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in {"404", "NoSuchBucket", "NotFound"}:
            raise
        client.create_bucket(Bucket=settings.bucket)


def error_code(exc: BaseException) -> str:
    """The S3 error code of a botocore `ClientError` ("NoSuchKey", "PreconditionFailed", "404", ...), else ""."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def bucket_error(exc: BaseException, settings: S3Settings, client: Any = None) -> BaseException:
    """`S3Error` naming `CL_S3_BUCKET` when the bucket does not exist, the original exception otherwise.

    Some servers answer a put into a missing bucket with AccessDenied (SeaweedFS does); given the `client`, such
    an answer is checked with HeadBucket before it is blamed on permissions."""
    code = error_code(exc)
    missing = code == "NoSuchBucket"
    if not missing and client is not None and code in {"AccessDenied", "403"}:
        try:
            client.head_bucket(Bucket=settings.bucket)
        except Exception as probe:
            missing = error_code(probe) in {"404", "NoSuchBucket", "NotFound"}
    if missing:
        return S3Error(f"S3 bucket {settings.bucket!r} does not exist at {settings.where}: create it or set "
                       "CL_S3_BUCKET to an existing bucket")
    return exc


def reraise(exc: BaseException, settings: S3Settings, client: Any = None) -> NoReturn:
    """Raise `bucket_error(exc, ...)`: the clear error when there is one, `exc` itself otherwise."""
    clear = bucket_error(exc, settings, client)
    if clear is exc:
        raise exc
    raise clear from exc
