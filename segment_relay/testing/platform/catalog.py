"""What the fake knows of Adobe's fixed catalogue: connection specs, the destination flow spec,
the permission names, and the default audiences.

The ids are Adobe's real ones (see notes/adobe-platform.md §1.1). The auth spec names are the
current ones; the client must read them from ``GET /connectionSpecs/{id}`` (``authSpec[].name``),
never hard-code them. Where Adobe documents nothing (the SAS variant's name, the target parameter
keys behind "Include Segment Names/Timestamps") the fake picks a plausible value and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..exports import DEFAULT_SEGMENTS

__all__ = [
    "PROFILE_SOURCE_SPEC_ID",
    "KINESIS_SPEC_ID",
    "EVENT_HUBS_SPEC_ID",
    "DESTINATION_FLOW_SPEC_ID",
    "KINESIS_AUTH_SPEC",
    "EVENT_HUBS_AUTH_SPEC",
    "EVENT_HUBS_SAS_AUTH_SPEC",
    "DESTINATION_SPEC_IDS",
    "DEFAULT_SCOPES",
    "Audience",
    "DEFAULT_AUDIENCES",
    "connection_specs",
    "flow_specs",
    "secret_fields",
    "SECRET_KEYS",
]

PROFILE_SOURCE_SPEC_ID = "8a9c3494-9708-43d7-ae3f-cda01e5030e1"
KINESIS_SPEC_ID = "86043421-563b-46ec-8e6c-e23184711bf6"
EVENT_HUBS_SPEC_ID = "bf9f5905-92b7-48bf-bf20-455bc6b60a4e"
DESTINATION_FLOW_SPEC_ID = "71471eba-b620-49e4-90fd-23f1fa0174d8"
DESTINATION_SPEC_IDS = frozenset((KINESIS_SPEC_ID, EVENT_HUBS_SPEC_ID))

KINESIS_AUTH_SPEC = "Aws Kinesis authentication credentials"
EVENT_HUBS_AUTH_SPEC = "Azure EventHub authentication credentials"
# Adobe documents a "SAS authentication" variant for Event Hubs but not its spec name (notes §6.7):
# this name is the fake's guess, offered only when asked for (FakePlatform(eventhubs_sas_auth=True)).
EVENT_HUBS_SAS_AUTH_SPEC = "Azure EventHub SAS authentication credentials"

# The OAuth Server-to-Server scopes of an AEP credential (notes §3); the fake grants only these.
DEFAULT_SCOPES: tuple[str, ...] = (
    "openid", "AdobeID", "read_organizations", "additional_info.projectedProductContext", "session",
)

_PROVIDER_ID = "521eee4d-8cbe-4906-bb48-fb6bd4450033"  # one made-up provider id for all three specs
_SCHEMA = "http://json-schema.org/draft-07/schema#"


@dataclass(frozen=True)
class Audience:
    """A segment definition / audience the fake serves from the Segmentation API."""

    id: str
    name: str
    description: str = ""
    merge_policy_id: str = "5ed35fd8-6eeb-4ad2-bed9-43e695b8ac0b"
    expression: str = 'person.name.lastName.isNotNull()'
    created_ms: int = 1_700_000_000_000
    updated_ms: int = 1_700_000_000_000
    continuous: bool = True  # streaming evaluation, which Kinesis/Event Hubs activation relies on
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the definition as-is
    # An uploaded (external) audience: not a segment definition; its audienceId is this id from
    # outside Platform (``id`` stays Platform's), and a dataflow selects it by that id together
    # with ``systemSegmentId`` (``id``) and ``namespace``.
    external_id: str | None = None
    namespace: str = "AEPSegments"

    @property
    def selector_id(self) -> str:
        """What a dataflow's segment selector names it by."""
        return self.external_id if self.external_id is not None else self.id


DEFAULT_AUDIENCES: tuple[Audience, ...] = tuple(
    Audience(
        id=segment_id, name=name, description=f"{name} (seeded by the fake platform)",
        expression=f'segmentMembership.ups.size() > {i}',
        created_ms=1_700_000_000_000 + i * 86_400_000, updated_ms=1_700_000_000_000 + i * 90_000_000,
    )
    for i, (segment_id, name) in enumerate(DEFAULT_SEGMENTS)
)


def _secret(title: str) -> dict[str, Any]:
    # format: password is how a connection spec marks a credential; GETs mask these fields.
    return {"type": "string", "format": "password", "description": title}


def _text(title: str) -> dict[str, Any]:
    return {"type": "string", "description": title}


_SEGMENT_TOGGLES: dict[str, Any] = {
    # Adobe does not document the parameter names behind the UI toggles (notes §6.8); these are the
    # fake's. As in the UI, both are off until turned on: the simulator includes names and timestamps
    # only when a toggle is true.
    "includeSegmentNames": {"type": "boolean", "description": "Include audience names in segmentMembership."},
    "includeSegmentTimestamps": {
        "type": "boolean", "description": "Include createdAt/updatedAt/mappingCreatedAt/mappingUpdatedAt.",
    },
}


def _kinesis() -> dict[str, Any]:
    return {
        "id": KINESIS_SPEC_ID,
        "name": "Amazon Kinesis",
        "providerId": _PROVIDER_ID,
        "version": "1.0",
        "authSpec": [{
            "name": KINESIS_AUTH_SPEC,
            "type": "AwsKinesisAuth",
            "spec": {
                "$schema": _SCHEMA,
                "type": "object",
                "description": "Access key pair of an IAM user allowed kinesis:ListStreams, PutRecord and PutRecords.",
                "properties": {
                    "accessKeyId": _text("AWS access key id."),
                    "secretKey": _secret("AWS secret access key."),
                    "region": _text("AWS region of the stream, e.g. us-east-1."),
                    "connectionUrl": _text("Listed by Adobe as an alternative to region; undocumented."),
                },
                "required": ["accessKeyId", "secretKey"],
                "anyOf": [{"required": ["region"]}, {"required": ["connectionUrl"]}],
            },
        }],
        "targetSpec": {
            "name": "Amazon Kinesis stream",
            "spec": {
                "$schema": _SCHEMA,
                "type": "object",
                "description": "Where profile exports are written.",
                "properties": {
                    "stream": _text("Name of an existing Kinesis data stream."),
                    "region": _text("AWS region of the stream."),
                    **_SEGMENT_TOGGLES,
                },
                "required": ["stream", "region"],
            },
        },
        "attributes": {"category": "Cloud Storage", "isSource": False, "isDestination": True, "isStreaming": True},
    }


def _event_hubs() -> dict[str, Any]:
    standard = {
        "sasKeyName": _text("Name of a SAS policy with Manage rights on the namespace."),
        "sasKey": _secret("Primary key of that SAS policy."),
        "namespace": _text("Event Hubs namespace (the fake also accepts host:port of a local emulator)."),
    }
    return {
        "id": EVENT_HUBS_SPEC_ID,
        "name": "Azure Event Hubs",
        "providerId": _PROVIDER_ID,
        "version": "1.0",
        "authSpec": [
            {
                "name": EVENT_HUBS_AUTH_SPEC,
                "type": "EventHubStandardAuth",
                "spec": {
                    "$schema": _SCHEMA, "type": "object",
                    "description": "Namespace-level SAS policy (standard authentication).",
                    "properties": standard,
                    "required": ["sasKeyName", "sasKey", "namespace"],
                },
            },
            {
                "name": EVENT_HUBS_SAS_AUTH_SPEC,
                "type": "EventHubSasAuth",
                "spec": {
                    "$schema": _SCHEMA, "type": "object",
                    "description": "Hub-scoped SAS policy (SAS authentication).",
                    "properties": {**standard, "eventHubName": _text("The event hub the key is scoped to.")},
                    "required": ["sasKeyName", "sasKey", "namespace", "eventHubName"],
                },
            },
        ],
        "targetSpec": {
            "name": "Azure Event Hubs event hub",
            "spec": {
                "$schema": _SCHEMA,
                "type": "object",
                "description": "Where profile exports are written.",
                "properties": {"eventHubName": _text("Name of an existing event hub."), **_SEGMENT_TOGGLES},
                "required": ["eventHubName"],
            },
        },
        "attributes": {"category": "Cloud Storage", "isSource": False, "isDestination": True, "isStreaming": True},
    }


def _profile_source() -> dict[str, Any]:
    return {
        "id": PROFILE_SOURCE_SPEC_ID,
        "name": "Profile Service",
        "providerId": _PROVIDER_ID,
        "version": "1.0",
        "authSpec": [],  # the profile store needs no credentials
        "sourceSpec": {
            "name": "Profile store",
            "spec": {"$schema": _SCHEMA, "type": "object", "properties": {}},
        },
        "attributes": {"category": "Profile", "isSource": True, "isDestination": False},
    }


def connection_specs(*, eventhubs_sas_auth: bool = True) -> list[dict[str, Any]]:
    """Fresh copies, so a handler can never mutate the catalogue. Without ``eventhubs_sas_auth``
    Event Hubs offers only the documented (standard) auth spec."""
    event_hubs = _event_hubs()
    if not eventhubs_sas_auth:
        event_hubs["authSpec"] = [a for a in event_hubs["authSpec"] if a["name"] != EVENT_HUBS_SAS_AUTH_SPEC]
    return [_profile_source(), _kinesis(), event_hubs]


def flow_specs() -> list[dict[str, Any]]:
    return [{
        "id": DESTINATION_FLOW_SPEC_ID,
        "name": "Profile-based destination dataflow",
        "providerId": _PROVIDER_ID,
        "version": "1.0",
        "sourceConnectionSpecIds": [PROFILE_SOURCE_SPEC_ID],
        "targetConnectionSpecIds": [KINESIS_SPEC_ID, EVENT_HUBS_SPEC_ID],
        "transformationSpecs": {"name": "GeneralTransform", "spec": {"$schema": _SCHEMA, "type": "object"}},
        "attributes": {"isDestinationFlow": True},
    }]


def secret_fields(spec_id: str, auth_spec_name: str) -> frozenset[str]:
    """The auth params of that auth spec that are credentials (masked on read, never logged)."""
    for spec in connection_specs():
        if spec["id"] == spec_id:
            for auth in spec["authSpec"]:
                if auth["name"] == auth_spec_name:
                    props = auth["spec"]["properties"]
                    return frozenset(k for k, v in props.items() if v.get("format") == "password")
    return frozenset()


# Every key whose value is a credential, in any body the fake records: the IMS form field, the
# bearer token IMS hands out, and the connection specs' password-format auth params.
SECRET_KEYS: frozenset[str] = frozenset(
    {"client_secret", "access_token", "secretKey", "sasKey", "secretAccessKey", "aws_secret_access_key", "password"}
)
