"""Builds the SDK's consumer client and the checkpoint store from settings, and turns the
errors that stop a relay from starting into one clear line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any

from ....errors import StartupError
from .settings import EventHubsSettings

log = logging.getLogger(__name__)
_CLOSE_TIMEOUT_S = 15.0
_DEFAULT_CREDENTIAL_HINT = (
    "the Azure credential needs azure-identity: pip install 'segment-relay[azure-identity]' "
    "(or set eventhubs.connection_string and eventhubs.checkpoint_connection_string instead)"
)


def default_credential() -> Any:
    """azure-identity's DefaultAzureCredential (workload identity, managed identity, env, CLI).
    It is imported only here: connection strings need no extra package."""
    try:
        from azure.identity.aio import DefaultAzureCredential
    except ImportError:
        raise StartupError(_DEFAULT_CREDENTIAL_HINT) from None
    return DefaultAzureCredential()


class Clients(contextlib.AsyncExitStack):
    """The consumer client and checkpoint store of one source; closing it closes both (and an
    owned credential)."""

    consumer: Any
    probe: Any  # for management calls (the start-up check, the lag poll): one retry, fails fast
    checkpoint_store: Any


async def open_clients(settings: EventHubsSettings) -> Clients:
    from .blob_checkpoints import ForwardOnlyBlobCheckpointStore

    clients = Clients()
    credential = settings.credential
    needs_credential = settings.connection_string is None or settings.checkpoint_account_url is not None
    if credential is None and needs_credential:
        credential = default_credential()
        clients.push_async_callback(credential.close)
    store: Any
    if settings.checkpoint_path is not None:
        import sqlite3

        from .sqlite_checkpoints import SqliteCheckpointStore

        try:
            store = SqliteCheckpointStore(settings.checkpoint_path)
        except sqlite3.Error as exc:
            await clients.aclose()
            raise StartupError(f"eventhubs.checkpoint_path {settings.checkpoint_path!r}: cannot use it: {exc}") from None
    elif settings.checkpoint_connection_string is not None:
        store = ForwardOnlyBlobCheckpointStore.from_connection_string(
            settings.checkpoint_connection_string, settings.checkpoint_container
        )
    else:
        assert settings.checkpoint_account_url is not None  # EventHubsSettings checks one of the three is set
        store = ForwardOnlyBlobCheckpointStore.from_account_url(
            settings.checkpoint_account_url, settings.checkpoint_container, credential
        )
    clients.push_async_callback(store.close)
    shared = {**shared_tls(settings.client_options), **settings.client_options}
    options: dict[str, Any]
    if settings.read_only_consumer_group is None:
        options = {
            "checkpoint_store": store,
            "load_balancing_interval": settings.load_balancing_interval_s,
            "partition_ownership_expiration_interval": settings.ownership_expiration,
            "load_balancing_strategy": settings.load_balancing_strategy,
            **shared,
        }
    else:
        # A dry run: the store is only read (for where to start). Without one the SDK reads every
        # partition itself, claims no ownership and opens no epoch receiver, so it takes nothing
        # from the running replicas (who read through another consumer group anyway). Its loop
        # still sleeps a load-balancing interval between checks, and close() waits for that sleep.
        options = {"load_balancing_interval": min(settings.load_balancing_interval_s, 1.0), **shared}
    try:
        consumer = _consumer_client(settings, credential, options)
        # The start-up check's own client: one retry, so that a wrong hub fails in about a
        # second instead of after the receiving client's full backoff (about 13 s).
        probe = _consumer_client(settings, credential, {**shared, "retry_total": 1})
    except ValueError as exc:  # a malformed connection string; the SDK's message never includes the key
        await clients.aclose()
        raise StartupError(f"eventhubs.connection_string is not a valid Event Hubs connection string: {exc}") from None
    clients.push_async_callback(_close_consumer, consumer)
    clients.push_async_callback(_close_consumer, probe)
    clients.consumer = consumer
    clients.probe = probe
    clients.checkpoint_store = store
    return clients


def shared_tls(client_options: dict[str, Any]) -> dict[str, Any]:
    """One TLS context for every AMQP connection of the source. Without one the SDK builds a
    context and loads the system CA bundle for each connection it opens (each partition's
    receiver, and every management call: the start-up check, each lag poll), 25 to 80 ms of CPU
    each, even for a connection without TLS (the emulator). ``connection_verify`` (a CA bundle)
    keeps its meaning: the SDK ignores it once it is given a context, so the context loads it."""
    if "ssl_context" in client_options:
        return {}
    return {"ssl_context": ssl.create_default_context(cafile=client_options.get("connection_verify"))}


def _consumer_client(settings: EventHubsSettings, credential: Any, options: dict[str, Any]) -> Any:
    from azure.eventhub.aio import EventHubConsumerClient as SDKConsumerClient

    from .received import light_consumer_client

    EventHubConsumerClient = light_consumer_client(SDKConsumerClient)  # noqa: N806 - a class
    group = settings.read_only_consumer_group or settings.consumer_group
    if settings.connection_string is not None:
        return EventHubConsumerClient.from_connection_string(
            settings.connection_string, consumer_group=group, eventhub_name=settings.hub, **options
        )
    assert settings.fully_qualified_namespace is not None
    return EventHubConsumerClient(settings.fully_qualified_namespace, settings.hub, group, credential, **options)


async def _close_consumer(consumer: Any) -> None:
    # The SDK's close() can wait forever when called before its receive loop got going; a
    # shutdown must end. Ownership not released then simply expires (ownership_expiration_s).
    try:
        await asyncio.wait_for(consumer.close(), _CLOSE_TIMEOUT_S)
    except TimeoutError:
        log.warning("the Event Hubs client did not close in time; its partitions are freed when ownership expires",
                    extra={"timeout_s": _CLOSE_TIMEOUT_S})


def explain(exc: BaseException, settings: EventHubsSettings, *, part: str) -> str:
    """One line naming what is wrong and what to do. ``part`` is "event hub" or "checkpoint store"."""
    name = type(exc).__name__
    text = str(exc)
    if part == "checkpoint store":
        where = f"checkpoint container {settings.checkpoint_container!r}"
        if name == "ResourceNotFoundError" or "ContainerNotFound" in text:
            return f"{where} does not exist: create it (az storage container create -n {settings.checkpoint_container})"
        if name in ("ClientAuthenticationError", "HttpResponseError") and ("403" in text or "Authorization" in text):
            return f"{where}: access denied; the identity needs 'Storage Blob Data Contributor' on it"
        if name == "ServiceRequestError":
            return f"{where}: cannot reach the blob endpoint ({_first_line(text)}); check the account URL and network"
        return f"{where}: {name}: {_first_line(text)}"
    hub = f"event hub {settings.hub!r}"
    lowered = text.lower()
    if "not-found" in lowered or "notfound" in lowered or "404" in text or "could not be found" in lowered:
        return f"{hub} was not found in the namespace: check the source name and eventhubs.connection_string"
    if name == "AuthenticationError" or "unauthorized" in lowered or "auth-failed" in lowered:
        return f"{hub}: authentication failed; check the key or that the identity has 'Azure Event Hubs Data Receiver'"
    if name == "ConnectError" or "connection" in lowered:
        return f"{hub}: cannot connect to the namespace ({_first_line(text)}); check the endpoint and network"
    return f"{hub}: {name}: {_first_line(text)}"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text.strip() else "no detail"
