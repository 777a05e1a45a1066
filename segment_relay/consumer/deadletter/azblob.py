"""Dead-letter objects in Azure Blob storage (``azblob://CONTAINER/PREFIX``), through
azure-storage-blob's aio client: a connection string, or an account URL and an Azure AD
credential (workload identity, made by the caller), as for the Event Hubs checkpoints."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from ...errors import StartupError


class BlobObjects:
    """Blobs under ``container/prefix/`` of one storage account. With an account URL,
    ``credential`` makes the Azure credential when it is first needed; ``close`` closes it."""

    def __init__(self, container: str, prefix: str = "", *, connection_string: str | None = None,
                 account_url: str | None = None, credential: Callable[[], Any] | None = None) -> None:
        if not container:
            raise ValueError("an azblob:// dead letter needs a container: azblob://CONTAINER/PREFIX")
        if (connection_string is None) == (account_url is None):
            raise ValueError("an azblob:// dead letter needs exactly one of a connection string or an account URL")
        if account_url is not None and credential is None:
            raise ValueError("an azblob:// dead letter with an account URL needs an Azure credential")
        self._make_credential = credential  # called at the first use: making one needs azure-identity
        self.container = container
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self._connection_string = connection_string
        self._account_url = account_url
        self._credential: Any = None
        self._client: Any = None

    def __repr__(self) -> str:
        return f"BlobObjects({self.describe()!r})"

    def describe(self) -> str:
        return f"azblob://{self.container}/{self.prefix}"

    def _container(self) -> Any:
        if self._client is None:
            from azure.storage.blob.aio import ContainerClient

            if self._connection_string is not None:
                self._client = ContainerClient.from_connection_string(self._connection_string, self.container)
            else:
                assert self._account_url is not None and self._make_credential is not None
                self._credential = self._make_credential()
                self._client = ContainerClient(self._account_url, self.container, credential=self._credential)
        return self._client

    async def check(self, probe_name: str) -> None:
        where = f"dead letter {self.describe()}"
        try:
            await self._container().upload_blob(self.prefix + probe_name, b"{}", overwrite=True)
        except StartupError:
            raise
        except Exception as exc:  # noqa: BLE001 - every SDK error becomes one line
            name = type(exc).__name__
            text = str(exc)
            if name == "ResourceNotFoundError" or "ContainerNotFound" in text:
                raise StartupError(f"{where}: the container does not exist: create it "
                                   f"(az storage container create -n {self.container})") from None
            if name == "ClientAuthenticationError" or "AuthorizationFailure" in text or "403" in text:
                raise StartupError(f"{where}: access denied; the identity needs 'Storage Blob Data Contributor' "
                                   "on the container") from None
            if name == "ServiceRequestError":
                raise StartupError(f"{where}: cannot reach the blob endpoint; check the account URL and network") from None
            first = text.strip().splitlines()[0][:300] if text.strip() else "no detail"
            raise StartupError(f"{where}: {name}: {first}") from None

    async def put(self, name: str, data: bytes) -> None:
        await self._container().upload_blob(self.prefix + name, data, overwrite=True)

    async def names(self, under: str = "") -> AsyncIterator[str]:
        async for blob in self._container().list_blobs(name_starts_with=self.prefix + under):
            yield blob.name[len(self.prefix):]

    async def get(self, name: str) -> bytes:
        downloader = await self._container().download_blob(self.prefix + name)
        return bytes(await downloader.readall())

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()
        close = getattr(self._credential, "close", None)
        if close is not None:
            await close()
