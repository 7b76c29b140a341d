"""Where S3 credentials and endpoints come from: config first, then the usual AWS variables."""

from __future__ import annotations

import os

from pydantic import Field

from tkllm_ray.config.base import ConfigModel


class StorageOptions(ConfigModel):
    """S3 settings; every field falls back to the standard AWS environment variable."""

    endpoint_url: str | None = Field(
        None, description="S3 endpoint, e.g. http://127.0.0.1:8333 (env AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)"
    )
    region: str | None = Field(None, description="S3 region (env AWS_REGION / AWS_DEFAULT_REGION)")
    access_key_id: str | None = Field(None, description="access key (env AWS_ACCESS_KEY_ID)")
    secret_access_key: str | None = Field(None, description="secret key (env AWS_SECRET_ACCESS_KEY)")
    session_token: str | None = Field(None, description="session token (env AWS_SESSION_TOKEN)")

    def resolved(self) -> "StorageOptions":
        env = os.environ.get
        return StorageOptions(
            endpoint_url=self.endpoint_url or env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL"),
            region=self.region or env("AWS_REGION") or env("AWS_DEFAULT_REGION") or "us-east-1",
            access_key_id=self.access_key_id or env("AWS_ACCESS_KEY_ID"),
            secret_access_key=self.secret_access_key or env("AWS_SECRET_ACCESS_KEY"),
            session_token=self.session_token or env("AWS_SESSION_TOKEN"),
        )
