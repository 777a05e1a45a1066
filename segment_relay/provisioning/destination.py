"""The declarative destination file (TOML): which Adobe org and sandbox, which stream or hub,
which audiences and profile attributes. Secrets are never in the file, only the names of the
environment variables that hold them."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from .errors import ProvisioningError
from .http import DEFAULT_PLATFORM_URL
from .ims import DEFAULT_IMS_URL, DEFAULT_SCOPES


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdobeCredentials(_Model):
    org_id: str = Field(description="IMS organization id, ending in @AdobeOrg")
    client_id: str | None = None
    client_id_env: str = "ADOBE_CLIENT_ID"
    client_secret_env: str = "ADOBE_CLIENT_SECRET"
    scopes: list[str] = Field(default_factory=lambda: list(DEFAULT_SCOPES))
    ims_url: str = DEFAULT_IMS_URL
    platform_url: str = DEFAULT_PLATFORM_URL


    @field_validator("org_id")
    @classmethod
    def _an_org_id(cls, value: str) -> str:
        if not value.endswith("@AdobeOrg") or value == "@AdobeOrg":
            raise ValueError(
                f"{value!r} is not an IMS organization id: it looks like 0123456789ABCDEF01234567@AdobeOrg "
                "(Developer Console → project → OAuth Server-to-Server credential → Organization ID)")
        return value


class KinesisTarget(_Model):
    stream: str = Field(min_length=1)
    region: str = Field(min_length=1)
    access_key_id_env: str = "ADOBE_KINESIS_ACCESS_KEY_ID"
    secret_key_env: str = "ADOBE_KINESIS_SECRET_KEY"


class EventHubsTarget(_Model):
    namespace: str = Field(min_length=1, description="The Event Hubs namespace (Adobe's 'namespace' parameter)")
    hub: str = Field(min_length=1)
    sas_key_name: str = Field(min_length=1)
    sas_key_env: str = "ADOBE_EVENTHUBS_SAS_KEY"
    hub_scoped_key: bool = Field(False, description="The SAS policy is the hub's, not the namespace's")


class AudienceRef(_Model):
    id: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _one(self) -> AudienceRef:
        if (self.id is None) == (self.name is None):
            raise ValueError("give an audience either an id or a name")
        return self


class DestinationFile(_Model):
    name: str = Field(min_length=1, max_length=200, description="Names every entity this file manages")
    sandbox: str = Field("prod", min_length=1)
    enabled: bool = True
    # Adopt a dataflow made elsewhere (Adobe's UI) by its id; without it, the dataflow named `name`.
    dataflow_id: str | None = Field(None, min_length=1, description="The existing dataflow this file manages")
    adobe: AdobeCredentials
    kinesis: KinesisTarget | None = None
    eventhubs: EventHubsTarget | None = None
    audiences: list[AudienceRef] = Field(default_factory=list)
    attributes: list[str] = Field(default_factory=list, description="Profile attribute paths, e.g. person.name.firstName")
    # The export toggles of Adobe's UI ("Include Segment Names/Timestamps"); None leaves them as they are there.
    include_segment_names: bool | None = Field(None, description="Audience names in each export's segmentMembership")
    include_segment_timestamps: bool | None = Field(
        None, description="createdAt/updatedAt/mappingCreatedAt/mappingUpdatedAt in each export's segmentMembership")

    @field_validator("name")
    @classmethod
    def _no_comma(cls, value: str) -> str:
        if "," in value:  # property=name==a,b means "a or b" to the Flow Service filters
            raise ValueError("must not contain a comma (Flow Service filters split on it)")
        return value

    @model_validator(mode="after")
    def _one_target(self) -> DestinationFile:
        if (self.kinesis is None) == (self.eventhubs is None):
            raise ValueError("give exactly one of a [kinesis] or an [eventhubs] section")
        return self

    @property
    def target_type(self) -> Literal["kinesis", "eventhubs"]:
        return "kinesis" if self.kinesis is not None else "eventhubs"


class Destination:
    """A destination file with its secrets read from the environment."""

    def __init__(self, spec: DestinationFile, secrets: dict[str, SecretStr], client_id: str, path: str) -> None:
        self.spec = spec
        self.secrets = secrets  # by environment variable name
        self.client_id = client_id
        self.path = path

    def __repr__(self) -> str:
        return f"Destination({self.spec.name!r}, {self.spec.target_type}, sandbox={self.spec.sandbox!r})"

    def secret(self, env_name: str) -> SecretStr:
        return self.secrets[env_name]

    def secret_values(self) -> list[str]:
        return [value.get_secret_value() for value in self.secrets.values()]


def load_destination(path: str | Path, environ: Mapping[str, str] | None = None, *, need_target_secrets: bool = True) -> Destination:
    """Read and check the file; read every secret it names from ``environ`` (default: os.environ).
    ``need_target_secrets`` is False for commands that never send them (status, destroy)."""
    environ = os.environ if environ is None else environ
    where = str(path)
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ProvisioningError(f"destination file {where!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProvisioningError(f"destination file {where!r} is not valid TOML: {exc}") from None
    try:
        spec = DestinationFile.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False):
            field = ".".join(str(part) for part in error["loc"]) or "(file)"
            line = f"field '{field}': {error['msg'].removeprefix('Value error, ')}"
            if error["type"] == "extra_forbidden" and len(error["loc"]) > 1 and error["loc"][-1] in DestinationFile.model_fields:
                line += " (in TOML, top-level keys go before the first [section])"  # the usual cause
            lines.append(line)
        raise ProvisioningError(f"destination file {where!r} is invalid:\n  " + "\n  ".join(lines)) from None

    needed = {spec.adobe.client_secret_env: "adobe.client_secret_env"}
    if spec.adobe.client_id is None:
        needed[spec.adobe.client_id_env] = "adobe.client_id_env"
    if need_target_secrets and spec.kinesis is not None:
        needed[spec.kinesis.access_key_id_env] = "kinesis.access_key_id_env"
        needed[spec.kinesis.secret_key_env] = "kinesis.secret_key_env"
    if need_target_secrets and spec.eventhubs is not None:
        needed[spec.eventhubs.sas_key_env] = "eventhubs.sas_key_env"
    missing = [f"${env} (named by {field})" for env, field in needed.items() if not environ.get(env)]
    if missing:
        raise ProvisioningError(f"destination file {where!r}: set the environment variable(s) " + ", ".join(missing))
    secrets = {env: SecretStr(environ[env]) for env in needed}
    client_id = spec.adobe.client_id or secrets.pop(spec.adobe.client_id_env).get_secret_value()
    return Destination(spec, secrets, client_id, where)
