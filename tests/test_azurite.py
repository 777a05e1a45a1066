"""Azurite (local Blob Storage, for the Event Hubs checkpoint store) answers the real aio blob client."""

from __future__ import annotations

import uuid

from azure.storage.blob.aio import BlobServiceClient

from segment_relay.testing.azure import ACCOUNT_KEY, Azurite, connection_string


def test_connection_string_names_the_dev_account_and_port() -> None:
    value = connection_string(10123)
    assert "AccountName=devstoreaccount1;" in value
    assert f"AccountKey={ACCOUNT_KEY};" in value
    assert "BlobEndpoint=http://127.0.0.1:10123/devstoreaccount1;" in value


async def test_container_blob_upload_and_list(azurite: Azurite) -> None:
    name = f"smoke-{uuid.uuid4().hex[:12]}"
    async with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        container = await service.create_container(name)
        await container.upload_blob("hub/cg/checkpoint/0", b"{}", metadata={"offset": "42", "sequencenumber": "7"})
        blobs = [blob async for blob in container.list_blobs(name_starts_with="hub/", include=["metadata"])]
        assert [(blob.name, blob.metadata) for blob in blobs] == [
            ("hub/cg/checkpoint/0", {"offset": "42", "sequencenumber": "7"})
        ]
        data = await (await container.download_blob("hub/cg/checkpoint/0")).readall()
        assert data == b"{}"
        assert name in [c.name async for c in service.list_containers()]
