"""One configuration model: TOML file, then SEGMENT_RELAY_* environment variables, then CLI flags
(each overriding the one before). Every field is documented in the README's config reference."""

from __future__ import annotations

import contextvars
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "SEGMENT_RELAY_"
CONFIG_FILE_ENV = "SEGMENT_RELAY_CONFIG"
_toml_path: contextvars.ContextVar[Path | None] = contextvars.ContextVar("toml_path", default=None)


class ConfigError(ValueError):
    """Bad configuration: the message names the field and what to do."""


def _split_list(value: Any) -> Any:
    # Environment variables and CLI flags give "a,b"; TOML gives a real list. Accept both.
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IdentityConfig(_Section):
    namespace_priority: list[str] = Field(
        default_factory=list, description="Namespaces tried in order to pick the profile key"
    )
    prefer_primary: bool = Field(True, description="An identity flagged primary wins over the priority list")
    mode: Literal["link", "key"] = Field(
        "key", description="link: a profile is found through any of its identities (it keeps its history "
                            "when it gains one, and profiles Adobe merges are merged); key: a profile is its "
                            "top-ranked identity only")
    link_namespaces: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Namespaces whose identities link profiles ('*': every namespace). Leave out any that "
                    "several people share (a device, a household, an IP address)")

    _split = field_validator("namespace_priority", "link_namespaces", mode="before")(
        classmethod(lambda cls, v: _split_list(v)))

    @field_validator("link_namespaces")
    @classmethod
    def _some_namespace(cls, value: list[str]) -> list[str]:
        if not value or any(not namespace.strip() for namespace in value):
            raise ValueError("list at least one namespace (or '*' for every namespace), none of them empty")
        return value


class ClaimsConfig(_Section):
    mode: Literal["auto", "on", "off"] = Field(
        "auto", description="Claim each profile in the state store while a replica works on it, so two replicas "
                            "never fire one change twice; auto: on with dynamodb and redis (stores replicas share), "
                            "off with memory and sqlite (turn it on when replicas share one sqlite file)")
    ttl_s: float = Field(60.0, ge=5, description="A claim a dead replica leaves is free again after this long "
                                                 "(renewed every third of it while in use)")

    def enabled_for(self, state: str) -> bool:
        if self.mode != "auto":
            return self.mode == "on"
        return state.startswith(("dynamodb:", "redis://", "rediss://"))


class PipelineConfig(_Section):
    concurrency: int = Field(64, ge=1, description="Calls in flight per single-change handler (one per profile)")
    max_in_flight_records: int = Field(10_000, ge=1, description="Records read but not finished, at most")
    max_in_flight_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Bytes of such records, at most")
    checkpoint_interval_s: float = Field(5.0, gt=0, description="Seconds between checkpoints")
    checkpoint_every_records: int | None = Field(
        None, ge=1, description="Also checkpoint once this many records finished since the last one"
    )
    shutdown_timeout_s: float = Field(30.0, gt=0, description="Seconds to drain in-flight work on SIGTERM")
    strict_entries: bool = Field(
        False, description="A malformed audience entry rejects its whole record, instead of going to the dead letter alone"
    )


class DeadLetterSinkConfig(_Section):
    """Settings of the dead-letter sink that ``dead_letter`` names."""

    worker: str | None = Field(None, description="Names this replica's objects; default: $HOSTNAME (the pod name)")
    max_buffer_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="s3://, azblob://: entries held between flushes before writes wait for one"
    )
    resume_lookback_s: float = Field(
        6 * 3600.0, ge=0, description="s3://, azblob://: how far back a replica reads a partition's objects when it "
        "starts on it, so as not to write again what a crashed owner wrote past the checkpoint",
    )
    max_file_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="file: rotate the file past this size")
    s3_endpoint_url: str | None = Field(None, description="s3://: an S3-compatible endpoint instead of AWS's")
    s3_region: str | None = Field(None, description="s3://: default: the standard AWS chain")
    azblob_connection_string: SecretStr | None = Field(None, description="azblob://: a storage account connection string")
    azblob_account_url: str | None = Field(
        None, description="azblob://: https://ACCOUNT.blob.core.windows.net, with an Azure credential"
    )


class RetryConfig(_Section):
    max_attempts: int = Field(5, ge=1, description="Handler attempts per change before the dead letter")
    initial_backoff_s: float = Field(0.2, ge=0)
    max_backoff_s: float = Field(30.0, ge=0)
    max_retry_after_s: float = Field(300.0, ge=0, description="Cap on a handler's Retry-After")
    handler_timeout_s: float = Field(30.0, gt=0, description="One handler call, at most")
    max_age_s: float = Field(
        6 * 3600.0, gt=0, description="A change whose record was read longer ago than this goes to the dead letter instead of waiting"
    )


class BatchConfig(_Section):
    """How changes are gathered for handlers that take batches (handle_batch)."""

    max_changes: int = Field(500, ge=1, description="Changes per handle_batch call, at most")
    max_wait_ms: float = Field(50.0, ge=0, description="How long a call waits for more changes before it goes")
    concurrency: int = Field(1, ge=1, description="handle_batch calls in flight per handler")


class CircuitConfig(_Section):
    """When a handler counts as down (a downstream outage) rather than failing on a poison change."""

    window: int = Field(20, ge=1, description="Calls whose outcome is remembered")
    min_calls: int = Field(5, ge=1, description="Outcomes needed in the window before the circuit can open")
    failure_ratio: float = Field(0.5, gt=0, le=1, description="Share of failed calls that opens the circuit")
    open_initial_s: float = Field(1.0, gt=0, description="First wait before a probe")
    open_max_s: float = Field(60.0, gt=0, description="Longest wait between probes")
    unready_when_open: bool = Field(True, description="Report not ready (/readyz 503) while a circuit is open")

    @model_validator(mode="after")
    def _consistent(self) -> CircuitConfig:
        if self.min_calls > self.window:
            raise ValueError("circuit.min_calls must be at most circuit.window")
        if self.open_initial_s > self.open_max_s:
            raise ValueError("circuit.open_initial_s must be at most circuit.open_max_s")
        return self


class KinesisConfig(_Section):
    """Used when source = "kinesis:STREAM". Credentials come from the standard AWS chain."""

    application: str = Field("segment-relay", min_length=1, description="Names the lease table: APPLICATION-leases")
    region: str | None = Field(None, description="AWS region; default: the AWS chain (AWS_REGION, profile)")
    endpoint_url: str | None = Field(None, description="Kinesis endpoint override")
    dynamodb_endpoint_url: str | None = Field(None, description="DynamoDB endpoint override (lease table)")
    worker_id: str | None = Field(None, description="Unique per replica; default hostname-pid")
    initial_position: Literal["TRIM_HORIZON", "LATEST", "AT_TIMESTAMP"] = "TRIM_HORIZON"
    initial_timestamp: datetime | None = Field(None, description="For AT_TIMESTAMP")
    get_records_limit: int = Field(1000, ge=1, le=10_000)
    idle_wait_s: float = Field(1.0, gt=0)
    min_get_records_interval_s: float = Field(0.2, ge=0, description="Pacing per shard; AWS allows 5 calls/s")
    lease_duration_s: float = Field(10.0, gt=0, description="A lease not renewed this long is taken over")
    renew_interval_s: float | None = Field(None, gt=0, description="Default: lease_duration_s / 3")
    shard_sync_interval_s: float = Field(60.0, gt=0)
    max_backoff_s: float = Field(10.0, gt=0)
    deaggregate: bool = Field(False, description="De-aggregate KPL records (pip install aws-kinesis-agg)")

    @model_validator(mode="after")
    def _consistent(self) -> KinesisConfig:
        if self.initial_position == "AT_TIMESTAMP" and self.initial_timestamp is None:
            raise ValueError("initial_position AT_TIMESTAMP needs kinesis.initial_timestamp")
        if self.renew_interval_s is not None and self.renew_interval_s >= self.lease_duration_s:
            raise ValueError("renew_interval_s must be shorter than lease_duration_s")
        return self


class EventHubsConfig(_Section):
    """Used when source = "eventhubs:HUB". Either SAS connection strings, or a namespace and an
    account URL with an Azure credential (needs the azure-identity extra)."""

    connection_string: SecretStr | None = Field(
        None, description="Endpoint=sb://NS.servicebus.windows.net/;SharedAccessKeyName=...;SharedAccessKey=..."
    )
    fully_qualified_namespace: str | None = Field(None, description="NS.servicebus.windows.net, with an Azure credential")
    consumer_group: str = Field("$Default", min_length=1)
    dry_run_consumer_group: str | None = Field(
        None, min_length=1, description="run --dry-run reads through this consumer group (one of its own, "
                                        "created for it), starting at consumer_group's checkpoints")
    checkpoint_connection_string: SecretStr | None = Field(None, description="Storage account connection string")
    checkpoint_account_url: str | None = Field(None, description="https://ACCOUNT.blob.core.windows.net, with an Azure credential")
    checkpoint_path: str | None = Field(
        None, description="A sqlite file instead of Blob storage: replicas on one host only; KEDA cannot read it"
    )
    checkpoint_container: str = Field("segment-relay-checkpoints", min_length=3, max_length=63)
    starting_position: str | datetime = Field(
        "earliest", description="No checkpoint yet: earliest | latest | an ISO-8601 time (read as a datetime)"
    )
    max_batch_size: int = Field(300, ge=1, description="Events per batch from the SDK")
    prefetch: int = Field(300, ge=1, description="Events the SDK fetches ahead, per partition")
    load_balancing_interval_s: float = Field(10.0, gt=0, description="How often a replica checks partition ownership")
    ownership_expiration_s: float | None = Field(None, gt=0, description="Default: 6 x load_balancing_interval_s")
    load_balancing_strategy: Literal["greedy", "balanced"] = "greedy"
    lag_interval_s: float = Field(10.0, gt=0, description="How often the lag metrics read each owned partition's newest event")

    @field_validator("starting_position", mode="before")
    @classmethod
    def _position(cls, value: Any) -> str | datetime:
        if value in ("earliest", "latest"):
            return str(value)
        try:  # a string from the environment or a flag, or a TOML datetime
            moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
        except ValueError:
            raise ValueError("use earliest, latest or an ISO-8601 time such as 2026-11-25T00:00:00Z") from None
        if moment.tzinfo is None:
            raise ValueError("give the time zone, e.g. 2026-11-25T00:00:00Z")
        return moment

    @field_validator("checkpoint_container")
    @classmethod
    def _container(cls, value: str) -> str:
        import re

        if not re.fullmatch(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9]))*", value):
            raise ValueError("a blob container name is 3-63 lower-case letters, digits and single hyphens")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> EventHubsConfig:
        if self.ownership_expiration_s is not None and self.ownership_expiration_s <= self.load_balancing_interval_s:
            raise ValueError("ownership_expiration_s must be longer than load_balancing_interval_s")
        return self

    def check_for_source(self) -> None:
        """Completeness, checked only when the Event Hubs source is chosen."""
        if (self.connection_string is None) == (self.fully_qualified_namespace is None):
            raise ValueError(
                "set exactly one of eventhubs.connection_string (SAS; env SEGMENT_RELAY_EVENTHUBS__CONNECTION_STRING) "
                "or eventhubs.fully_qualified_namespace (with an Azure credential)"
            )
        stores = (self.checkpoint_connection_string, self.checkpoint_account_url, self.checkpoint_path)
        if sum(store is not None for store in stores) != 1:
            raise ValueError(
                "set exactly one of eventhubs.checkpoint_connection_string or eventhubs.checkpoint_account_url "
                "(the Blob storage that keeps checkpoints and partition ownership), or eventhubs.checkpoint_path "
                "(a sqlite file, for one host)"
            )


class RelayConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        enable_decoding=False,
    )

    source: str = Field("file:-", description="file:PATH | file:- (stdin) | kinesis:STREAM | eventhubs:HUB")
    state: str = Field("sqlite:segment-relay.sqlite", description="memory | sqlite:PATH | dynamodb:TABLE | redis://HOST:PORT/DB")
    handlers: list[str] = Field(default_factory=lambda: ["log"])
    dead_letter: str = Field(
        "dead-letter.jsonl",
        description="Where invalid records and failed changes go: PATH | file:PATH | stdout | s3://BUCKET/PREFIX | "
                    "azblob://CONTAINER/PREFIX",
    )
    dead_letter_sink: DeadLetterSinkConfig = Field(default_factory=lambda: DeadLetterSinkConfig())
    segments: list[str] = Field(default_factory=list, description="Only these segment ids; empty = all")
    checkpoint_file: str | None = Field(None, description="file source: where to keep the last finished line")
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Serve /metrics, /healthz, /readyz")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    identity: IdentityConfig = Field(default_factory=lambda: IdentityConfig())
    claims: ClaimsConfig = Field(default_factory=lambda: ClaimsConfig())
    pipeline: PipelineConfig = Field(default_factory=lambda: PipelineConfig())
    retry: RetryConfig = Field(default_factory=lambda: RetryConfig())
    batch: BatchConfig = Field(default_factory=lambda: BatchConfig())
    circuit: CircuitConfig = Field(default_factory=lambda: CircuitConfig())
    kinesis: KinesisConfig = Field(default_factory=lambda: KinesisConfig())
    eventhubs: EventHubsConfig = Field(default_factory=lambda: EventHubsConfig())

    _split = field_validator("handlers", "segments", mode="before")(classmethod(lambda cls, v: _split_list(v)))

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        kind, _, arg = value.partition(":")
        if kind not in ("file", "kinesis", "eventhubs") or not arg:
            raise ValueError("use file:PATH, file:- (stdin), kinesis:STREAM (a name or an ARN) or eventhubs:HUB")
        return value

    @model_validator(mode="after")
    def _source_settings(self) -> RelayConfig:
        if self.source.startswith("eventhubs:"):
            self.eventhubs.check_for_source()
        return self

    @field_validator("state")
    @classmethod
    def _check_state(cls, value: str) -> str:
        if value.startswith(("redis://", "rediss://")):
            from urllib.parse import urlsplit

            try:
                urlsplit(value).port  # noqa: B018 - raises ValueError for a bad port
            except ValueError:
                # The message never repeats the URL: it may hold a password.
                raise ValueError("invalid redis URL: use redis://[[USER]:PASSWORD@]HOST[:PORT][/DB] or rediss://...") from None
            return value
        kind, _, arg = value.partition(":")
        if not ((kind == "memory" and not arg) or (kind in ("sqlite", "dynamodb") and arg)):
            raise ValueError("use memory, sqlite:PATH or dynamodb:TABLE, or a redis://HOST:PORT/DB URL (rediss:// for TLS)")
        return value

    @field_validator("dead_letter")
    @classmethod
    def _check_dead_letter(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        if sep and scheme in ("s3", "azblob"):
            if not rest.split("/", 1)[0]:
                raise ValueError(f"name the {'bucket' if scheme == 's3' else 'container'}: {scheme}://NAME/PREFIX")
        elif sep:
            raise ValueError("use PATH, file:PATH, stdout, s3://BUCKET/PREFIX or azblob://CONTAINER/PREFIX")
        elif value in ("", "file:"):
            raise ValueError("name the file: file:PATH")
        return value

    @model_validator(mode="after")
    def _dead_letter_settings(self) -> RelayConfig:
        sink = self.dead_letter_sink
        if self.dead_letter.startswith("azblob://") and \
                (sink.azblob_connection_string is None) == (sink.azblob_account_url is None):
            raise ValueError(
                "dead_letter azblob://: set exactly one of dead_letter_sink.azblob_connection_string "
                "(env SEGMENT_RELAY_DEAD_LETTER_SINK__AZBLOB_CONNECTION_STRING) or dead_letter_sink.azblob_account_url "
                "(with an Azure credential)")
        return self

    @field_validator("handlers")
    @classmethod
    def _need_handler(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one handler, e.g. log")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _toml_path.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def secrets_in(config: RelayConfig) -> list[str]:
    """Strings that must never reach a log line: credentials carried inside handler and state URLs."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    from .consumer.state.redis import url_password

    found: list[str] = []
    for secret in (config.eventhubs.connection_string, config.eventhubs.checkpoint_connection_string,
                   config.dead_letter_sink.azblob_connection_string):
        if secret is not None:
            found.append(secret.get_secret_value())
            fields = connection_string_fields(secret.get_secret_value())
            found.extend(fields[key] for key in _SECRET_FIELDS if key in fields)
    if config.state.startswith(("redis://", "rediss://")):
        state_password = url_password(config.state)
        if state_password:
            found.append(state_password)
            if unquote(state_password) != state_password:  # redis-py uses it percent-decoded
                found.append(unquote(state_password))
    for spec in config.handlers:
        _, _, arg = spec.partition(":")
        if "://" not in arg:
            continue
        try:
            parts = urlsplit(arg)
            password = parts.password
        except ValueError:
            found.append(arg)
            continue
        if password:
            found.append(password)
        if parts.query:
            found.append(parts.query)
            found.extend(value for _, value in parse_qsl(parts.query) if value)
        found.extend(segment for segment in parts.path.split("/") if len(segment) >= 12)  # path tokens
    return found


def environment_secrets() -> list[str]:
    """The values of the SDKs' own credential variables, which logs must not show either."""
    return [os.environ[name] for name in _SECRET_ENVIRONMENT if os.environ.get(name)]


def connection_string_fields(text: str) -> dict[str, str]:
    """The ``Key=value`` parts of an Azure connection string, by lower-cased key."""
    fields = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if sep and value.strip():
            fields[key.strip().lower()] = value.strip()
    return fields


_SECRET_FIELDS = ("sharedaccesskey", "accountkey", "sharedaccesssignature")
# The SDKs' own credential variables: their values are redacted too (logging also redacts every
# value shaped like a secret, for credentials that never pass through the environment, e.g. IRSA).
_SECRET_ENVIRONMENT = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AZURE_CLIENT_SECRET",
                       "AZURE_CLIENT_CERTIFICATE_PASSWORD", "AZURE_STORAGE_KEY", "AZURE_STORAGE_CONNECTION_STRING")


def load_config(path: str | Path | None = None, **overrides: Any) -> RelayConfig:
    """Build the configuration; raise ConfigError naming the bad field.

    ``overrides`` are CLI flags (None means not given). ``path`` defaults to
    $SEGMENT_RELAY_CONFIG when set.
    """
    if path is None:
        path = os.environ.get(CONFIG_FILE_ENV) or None
    toml_path = Path(path) if path is not None else None
    if toml_path is not None and not toml_path.is_file():
        raise ConfigError(f"config file {str(toml_path)!r} does not exist: pass an existing TOML file to --config")
    given = {key: value for key, value in overrides.items() if value is not None}
    token = _toml_path.set(toml_path)
    saved_config_env = os.environ.pop(CONFIG_FILE_ENV, None)  # not a field: keep it out of extra=forbid
    try:
        return RelayConfig(**given)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, toml_path)) from None
    except ValueError as exc:  # e.g. a TOML syntax error
        raise ConfigError(f"cannot read config file {str(toml_path)!r}: {exc}") from None
    finally:
        _toml_path.reset(token)
        if saved_config_env is not None:
            os.environ[CONFIG_FILE_ENV] = saved_config_env


def _describe(exc: ValidationError, path: Path | None) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"])
        env_name = ENV_PREFIX + "__".join(str(part) for part in error["loc"]).upper()
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:  # a rule across fields: its message names them
            lines.append(message)
            continue
        if error["type"] == "extra_forbidden":
            lines.append(f"config field '{field}': unknown field; check its spelling against the README's config reference")
            continue
        where = f"in {path}, " if path else ""
        lines.append(f"config field '{field}': {message} (set it {where}in {env_name} or with a flag)")
    return "invalid configuration:\n  " + "\n  ".join(lines)
