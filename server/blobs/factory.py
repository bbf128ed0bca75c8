"""Build the blob store that the settings name; the app factory calls this once."""

from __future__ import annotations

from server.blobs import BlobStore
from server.blobs.local import LocalBlobStore
from server.errors import BlobStoreError
from server.settings import Settings


def make_blob_store(settings: Settings) -> BlobStore:
    """A :class:`LocalBlobStore` or an :class:`S3BlobStore`, as ``settings.blob_store`` says.

    An S3 store needs an endpoint and explicit keys: credentials are never looked up
    elsewhere (environment, instance metadata), so nothing but the endpoint is contacted.
    """
    if settings.blob_store == "local":
        return LocalBlobStore(settings.resolved_blob_dir())
    endpoint = settings.s3_endpoint
    access_key = settings.s3_access_key
    secret_key = settings.s3_secret_key
    if not endpoint or not access_key or not secret_key:
        missing = [
            f"DIFFCAST_{name}"
            for name, value in (
                ("S3_ENDPOINT", endpoint),
                ("S3_ACCESS_KEY", access_key),
                ("S3_SECRET_KEY", secret_key),
            )
            if not value
        ]
        raise BlobStoreError(f"blob_store 's3' needs {', '.join(missing)}")
    from server.blobs.s3 import S3BlobStore  # boto3 is imported only when it is used

    return S3BlobStore(
        endpoint_url=endpoint,
        bucket=settings.s3_bucket,
        access_key=access_key,
        secret_key=secret_key,
        region=settings.s3_region,
    )
