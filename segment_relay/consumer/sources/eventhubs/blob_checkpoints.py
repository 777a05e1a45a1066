"""The SDK's BlobCheckpointStore, except that a checkpoint never moves back.

Two replicas can both be writing one partition's checkpoint for a moment: after a steal, the
old owner goes on until its load balancer's next cycle (or until the service disconnects its
receiver) and commits what it finished, while the new owner reads from the previous checkpoint
and commits its own progress. Both figures are true (each replica commits only what it
handled and saved), but with plain overwrites the last write wins: an old owner that was
behind could leave the checkpoint below what the new owner had already committed, and
nobody would write it again until new events came (seen in the replica suite: a partition
checkpointed at 82 of 284 for good, read again from there on the next restart).

So a checkpoint is written only over a lower one, by a conditional write on the blob's etag:
the figure kept is the highest anyone committed. Ownership and listing are the SDK's own, and
the blobs keep the SDK's names and metadata, so the SDK, KEDA and a plain BlobCheckpointStore
read them as before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.eventhub.aio import CheckpointStore
from azure.eventhub.extensions.checkpointstoreblobaio import BlobCheckpointStore
from azure.storage.blob.aio import BlobClient, ContainerClient

log = logging.getLogger(__name__)

_ATTEMPTS = 5  # each lost race is another writer's write: a few at most, in a hand-over


def checkpoint_blob_name(checkpoint: dict[str, Any]) -> str:
    """The SDK's name for a partition's checkpoint blob."""
    return "{}/{}/{}/checkpoint/{}".format(
        checkpoint["fully_qualified_namespace"], checkpoint["eventhub_name"],
        checkpoint["consumer_group"], checkpoint["partition_id"],
    ).lower()


class ForwardOnlyBlobCheckpointStore(CheckpointStore):  # type: ignore[misc]  # the SDK's base class is untyped
    def __init__(self, sdk_store: BlobCheckpointStore, container: ContainerClient) -> None:
        self._sdk = sdk_store
        self._container = container
        self._blobs: dict[str, BlobClient] = {}
        # Per blob: the etag and figure of our own last write. While the etag still matches,
        # nobody wrote since, and a write needs no read first: one request, as the SDK's.
        self._written: dict[str, tuple[str, int]] = {}

    @classmethod
    def from_connection_string(cls, connection_string: str, container: str) -> ForwardOnlyBlobCheckpointStore:
        return cls(BlobCheckpointStore.from_connection_string(connection_string, container),
                   ContainerClient.from_connection_string(connection_string, container))

    @classmethod
    def from_account_url(cls, account_url: str, container: str, credential: Any) -> ForwardOnlyBlobCheckpointStore:
        return cls(BlobCheckpointStore(account_url, container, credential=credential),
                   ContainerClient(account_url, container, credential=credential))

    def __repr__(self) -> str:
        return f"ForwardOnlyBlobCheckpointStore({self._container.container_name!r})"

    async def list_ownership(self, fully_qualified_namespace: str, eventhub_name: str, consumer_group: str,
                             **kwargs: Any) -> Iterable[dict[str, Any]]:
        return await self._sdk.list_ownership(fully_qualified_namespace, eventhub_name, consumer_group, **kwargs)

    async def claim_ownership(self, ownership_list: Iterable[dict[str, Any]], **kwargs: Any) -> Iterable[dict[str, Any]]:
        return await self._sdk.claim_ownership(ownership_list, **kwargs)

    async def list_checkpoints(self, fully_qualified_namespace: str, eventhub_name: str, consumer_group: str,
                               **kwargs: Any) -> Iterable[dict[str, Any]]:
        return await self._sdk.list_checkpoints(fully_qualified_namespace, eventhub_name, consumer_group, **kwargs)

    async def update_checkpoint(self, checkpoint: dict[str, Any], **kwargs: Any) -> None:
        name = checkpoint_blob_name(checkpoint)
        sequence = int(checkpoint["sequence_number"])
        metadata = {"offset": str(checkpoint["offset"]), "sequencenumber": str(sequence)}
        blob = self._blobs.get(name) or self._blobs.setdefault(name, self._container.get_blob_client(name))
        mine = self._written.get(name)
        etag = mine[0] if mine is not None and mine[1] < sequence else None
        for _ in range(_ATTEMPTS):
            if etag is None:
                try:
                    properties = await blob.get_blob_properties()
                except ResourceNotFoundError:
                    try:
                        written = await blob.upload_blob(b"", metadata=metadata, overwrite=False)
                    except ResourceExistsError:
                        continue  # another replica created it meanwhile: compare with its figure
                    self._written[name] = (str(written["etag"]), sequence)
                    return
                stored = int((properties.metadata or {}).get("sequencenumber", -1))
                if stored >= sequence:
                    log.debug("checkpoint kept: another replica committed further",
                              extra={"partition": checkpoint["partition_id"], "stored": stored, "ours": sequence})
                    return
                etag = properties.etag
            try:
                written = await blob.set_blob_metadata(metadata, etag=etag, match_condition=MatchConditions.IfNotModified)
            except (ResourceModifiedError, ResourceNotFoundError):
                etag = None  # written (or deleted) by someone else since: read it again, then decide
                continue
            self._written[name] = (str(written["etag"]), sequence)
            return
        # Not an error worth stopping for: the next checkpoint tries again, and what is not
        # checkpointed is only read again.
        log.warning("checkpoint not written: other writers kept changing it",
                    extra={"partition": checkpoint["partition_id"], "attempts": _ATTEMPTS})

    async def close(self) -> None:
        try:
            await self._sdk.close()
        finally:
            await self._container.close()
