"""Wires a RelayConfig into running parts: source, store, handlers, pipeline, ops server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import ConfigError, RelayConfig, connection_string_fields
from .consumer.claims import ProfileClaimer
from .consumer.deadletter import DeadLetter, JsonlDeadLetter, StdoutDeadLetter
from .consumer.identity import IdentityResolver
from .consumer.pipeline import Pipeline, PipelineSettings
from .consumer.profile_key import ProfileKeyRule
from .consumer.sources.base import Source
from .consumer.sources.file import FileSource
from .consumer.state import MembershipStore, open_store
from .consumer.state.base import AliasIndex, ProfileClaims
from .handlers.api import Handler
from .handlers.circuit import CircuitSettings
from .handlers.loader import HandlerSpecError, load_handler
from .handlers.router import BatchSettings, RetryPolicy, Router
from .ops.health import Health, OpsServer
from .ops.metrics import RelaySnapshot, metrics_registry

log = logging.getLogger(__name__)


def build_source(config: RelayConfig, on_client: Callable[[str, Any], None] | None = None) -> Source[Any]:
    kind, _, arg = config.source.partition(":")
    if kind == "file":
        return FileSource(arg, checkpoint_path=config.checkpoint_file)
    if kind == "kinesis":
        from .consumer.sources.kinesis import KinesisSource

        return KinesisSource(kinesis_settings(config, arg), on_client=on_client)
    if kind == "eventhubs":
        return _eventhubs_source(config, arg)
    raise ConfigError(
        f"config field 'source': unknown source {config.source!r}; use file:PATH, file:-, kinesis:STREAM or eventhubs:HUB"
    )


def kinesis_settings(config: RelayConfig, stream: str) -> Any:
    """The Kinesis source's settings: the [kinesis] section, for ``stream``."""
    from .consumer.sources.kinesis import InitialPosition, KinesisSettings

    section = config.kinesis.model_dump()
    section["initial_position"] = InitialPosition(section["initial_position"])
    if section["renew_interval_s"] is None:
        section["renew_interval_s"] = section["lease_duration_s"] / 3
    return KinesisSettings(stream=stream, read_ahead_records=config.pipeline.max_in_flight_records, **section)


def build_dead_letter(config: RelayConfig) -> DeadLetter:
    """The sink ``config.dead_letter`` names (see the README's "The dead letter")."""
    spec, sink = config.dead_letter, config.dead_letter_sink
    scheme, _, rest = spec.partition("://")
    name, _, prefix = rest.partition("/")
    if scheme in ("s3", "azblob"):
        from .consumer.deadletter.objects import ObjectDeadLetter, ObjectStore

        store: ObjectStore
        if scheme == "s3":
            from .consumer.deadletter.s3 import S3Objects

            store = S3Objects(name, prefix, region=sink.s3_region, endpoint_url=sink.s3_endpoint_url)
        else:
            from .consumer.deadletter.azblob import BlobObjects

            if sink.azblob_connection_string is not None:
                store = BlobObjects(name, prefix, connection_string=sink.azblob_connection_string.get_secret_value())
            else:
                from .consumer.sources.eventhubs.connection import default_credential

                store = BlobObjects(name, prefix, account_url=sink.azblob_account_url, credential=default_credential)
        worker = sink.worker or os.environ.get("HOSTNAME") or socket.gethostname()
        return ObjectDeadLetter(store, worker=worker, max_buffer_bytes=sink.max_buffer_bytes,
                                resume_lookback_s=sink.resume_lookback_s)
    if spec == "stdout":
        return StdoutDeadLetter()
    return JsonlDeadLetter(Path(spec.removeprefix("file:")), max_bytes=sink.max_file_bytes)


def _eventhubs_source(config: RelayConfig, hub: str) -> Source[Any]:
    from .consumer.sources.eventhubs import EventHubsSource

    return EventHubsSource(eventhubs_settings(config, hub))


def eventhubs_settings(config: RelayConfig, hub: str) -> Any:
    """The Event Hubs source's settings: the [eventhubs] section, for ``hub``."""
    from .consumer.sources.eventhubs import EventHubsSettings

    section = config.eventhubs
    secret = section.connection_string.get_secret_value() if section.connection_string is not None else None
    fields = connection_string_fields(secret or "")
    entity = fields.get("entitypath")
    if entity is not None and entity != hub:
        raise ConfigError(
            f"config field 'source': the hub {hub!r} differs from EntityPath={entity!r} in eventhubs.connection_string"
        )
    namespace = section.fully_qualified_namespace or fields.get("endpoint", "")
    if hub != hub.lower() or namespace != namespace.lower():
        # The SDK lower-cases checkpoint blob names; KEDA's blobMetadata reader does not.
        log.warning("hub or namespace name has upper-case letters: KEDA's blobMetadata checkpoint reader will not find "
                    "the checkpoints (see the README, Event Hubs)")
    checkpoint_secret = section.checkpoint_connection_string
    settings = EventHubsSettings(
        hub=hub,
        connection_string=secret,
        fully_qualified_namespace=section.fully_qualified_namespace,
        consumer_group=section.consumer_group,
        checkpoint_connection_string=checkpoint_secret.get_secret_value() if checkpoint_secret is not None else None,
        checkpoint_account_url=section.checkpoint_account_url,
        checkpoint_path=section.checkpoint_path,
        checkpoint_container=section.checkpoint_container,
        starting_position=section.starting_position,
        max_batch_size=section.max_batch_size,
        prefetch=section.prefetch,
        load_balancing_interval_s=section.load_balancing_interval_s,
        ownership_expiration_s=section.ownership_expiration_s,
        load_balancing_strategy=section.load_balancing_strategy,
        lag_interval_s=section.lag_interval_s,
        read_ahead_events=config.pipeline.max_in_flight_records,
    )
    return settings


def build_handlers(config: RelayConfig, extra: list[Handler] | None = None) -> list[Handler]:
    handlers: list[Handler] = []
    for spec in config.handlers:
        try:
            handlers.append(load_handler(spec))
        except HandlerSpecError as exc:
            raise ConfigError(f"config field 'handlers': {exc}") from None
    handlers += extra or []
    # Names label metrics and dead letters: two webhooks become "webhook" and "webhook#2".
    seen: dict[str, int] = {}
    for handler in handlers:
        count = seen[handler.name] = seen.get(handler.name, 0) + 1
        if count > 1:
            handler.name = f"{handler.name}#{count}"
    return handlers


class Relay:
    """One running relay: build it from a config, then ``await run()`` until the source ends or a signal."""

    def __init__(self, config: RelayConfig, *, extra_handlers: list[Handler] | None = None,
                 track_profiles: bool = False, on_client: Callable[[str, Any], None] | None = None,
                 source: Source[Any] | None = None, dead_letter: DeadLetter | None = None,
                 store: MembershipStore | None = None) -> None:
        """``extra_handlers`` join the configured ones (embedding, tests); ``on_client`` sees each
        cloud client a source creates (a test seam for fault injection); ``source``,
        ``dead_letter`` and ``store`` replace the configured ones (a dead-letter replay, a dry run)."""
        self.config = config
        if config.checkpoint_file and not config.source.startswith("file:"):
            raise ConfigError("config field 'checkpoint_file': only the file source uses it")
        self.source = source if source is not None else build_source(config, on_client)
        claims_on = config.claims.enabled_for(config.state)
        self.store = store if store is not None else open_store(config.state, profile_claims=claims_on)
        self.dead_letter = dead_letter if dead_letter is not None else build_dead_letter(config)
        circuit = config.circuit
        try:
            self.router = Router(
                build_handlers(config, extra_handlers), self.dead_letter,
                retry=RetryPolicy(**config.retry.model_dump()),  # the config sections mirror these fields
                batch=BatchSettings(max_changes=config.batch.max_changes, max_wait_s=config.batch.max_wait_ms / 1000,
                                    concurrency=config.batch.concurrency),
                circuit=CircuitSettings(window=circuit.window, min_calls=circuit.min_calls,
                                        failure_ratio=circuit.failure_ratio, open_initial_s=circuit.open_initial_s,
                                        open_max_s=circuit.open_max_s),
                concurrency=config.pipeline.concurrency,
            )
        except ValueError as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"config field 'handlers': {exc}") from None
        pipeline_settings = config.pipeline.model_dump()
        del pipeline_settings["concurrency"]  # the router's: calls in flight per handler
        identity: IdentityResolver | None = None
        if config.identity.mode == "link":
            if not isinstance(self.store, AliasIndex):
                raise ConfigError(f"config field 'identity.mode': the state store {self.store!r} keeps no "
                                  "identity links; use identity.mode = \"key\" with it")
            identity = IdentityResolver(self.store, config.identity.link_namespaces)
        claims: ProfileClaimer | None = None
        if claims_on:
            if not isinstance(self.store, ProfileClaims):
                raise ConfigError(f"config field 'claims.mode': the state store {self.store!r} cannot hold profile "
                                  "claims; use claims.mode = \"off\" with it")
            claims = ProfileClaimer(self.store, config.claims.ttl_s)
        self.pipeline = Pipeline(
            self.source, self.store, self.router, self.dead_letter,
            key_rule=ProfileKeyRule(config.identity.namespace_priority, config.identity.prefer_primary),
            identity=identity,
            claims=claims,
            settings=PipelineSettings(
                **pipeline_settings,
                segment_filter=frozenset(config.segments) if config.segments else None,
                track_profiles=track_profiles,
            ),
        )
        self.health = Health(extra_ready=self._ready)
        self.ops: OpsServer | None = None
        if config.metrics_port is not None:
            self.ops = OpsServer(metrics_registry(self.snapshot), self.health, host=config.metrics_host,
                                 port=config.metrics_port)

    def snapshot(self) -> RelaySnapshot:
        return RelaySnapshot(self.pipeline.snapshot(), self.router.snapshot(), self.source.snapshot(),
                             event_loop_stalls=self.health.stalls)

    def _ready(self) -> bool | str:
        if not self.pipeline.running:
            return False
        held = self.router.held_handlers() if self.config.circuit.unready_when_open else []
        return f"handler circuit open: {', '.join(held)}" if held else True

    def stop(self) -> None:
        self.health.mark_stopping()
        self.pipeline.stop()

    async def run(self) -> RelaySnapshot:
        loop = asyncio.get_running_loop()
        installed = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, self._on_signal, signum)
                installed.append(signum)
        watchdog = asyncio.create_task(self.health.watchdog(), name="watchdog")
        try:
            if self.ops is not None:
                await self.ops.start()
                log.info("serving metrics and probes", extra={"host": self.config.metrics_host, "port": self.ops.port})
            self.health.mark_started()
            log.info("relay started", extra={"source": self.source.name, "state": repr(self.store),
                                             "handlers": [h.name for h in self.router.handlers]})
            await self.pipeline.run()
            snapshot = self.snapshot()
            log.info("relay stopped", extra=snapshot.summary())
            return snapshot
        finally:
            self.health.mark_stopping()
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
            if self.ops is not None:
                await self.ops.stop()
            for signum in installed:
                loop.remove_signal_handler(signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.health.stopping and self.pipeline.running:
            # A second signal means "now". Nothing unfinished was checkpointed, so it is read again.
            log.warning("second signal: exiting without draining", extra={"signal": name})
            logging.shutdown()
            os._exit(128 + signum)
        log.info("signal received: finishing in-flight work", extra={"signal": name})
        self.stop()
