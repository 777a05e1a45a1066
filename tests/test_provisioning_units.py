"""The parts of provisioning that need no server: the destination file, selector patches, error lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from segment_relay.provisioning.destination import load_destination
from segment_relay.provisioning.errors import ProvisioningError
from segment_relay.provisioning.http import error_from
from segment_relay.provisioning.provisioner import selector_patch

ENV = {"ADOBE_CLIENT_ID": "client-1", "ADOBE_CLIENT_SECRET": "p8e-very-secret", "ADOBE_EVENTHUBS_SAS_KEY": "sas-secret"}

GOOD = """
name = "acme relay"
sandbox = "dev"
audiences = [{ id = "seg-1" }, { name = "Gold tier" }]
attributes = ["person.name.firstName"]

[adobe]
org_id = "ABC123@AdobeOrg"

[eventhubs]
namespace = "acme-ns"
hub = "exports"
sas_key_name = "adobe-send"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "destination.toml"
    path.write_text(text)
    return path


def test_a_destination_file_reads_its_secrets_from_the_environment_and_never_shows_them(tmp_path: Path) -> None:
    destination = load_destination(write(tmp_path, GOOD), ENV)
    assert destination.client_id == "client-1"
    assert destination.spec.target_type == "eventhubs" and destination.spec.sandbox == "dev"
    assert [a.id or a.name for a in destination.spec.audiences] == ["seg-1", "Gold tier"]
    assert "secret" not in repr(destination) and "secret" not in repr(destination.secrets)
    assert sorted(destination.secret_values()) == ["p8e-very-secret", "sas-secret"]


@pytest.mark.parametrize(("text", "env", "message"), [
    (GOOD, {"ADOBE_CLIENT_ID": "c"}, r"set the environment variable\(s\) \$ADOBE_CLIENT_SECRET \(named by adobe.client_secret_env\)"),
    (GOOD.replace("ABC123@AdobeOrg", "ABC123"), ENV,
     r"field 'adobe.org_id': 'ABC123' is not an IMS organization id: it looks like [0-9A-F]+@AdobeOrg \(Developer Console"),
    (GOOD.replace('hub = "exports"\n', ""), ENV, r"field 'eventhubs.hub': Field required"),
    (GOOD + '\n[kinesis]\nstream = "s"\nregion = "r"\n', ENV, r"exactly one of a \[kinesis\] or an \[eventhubs\] section"),
    (GOOD.replace('{ id = "seg-1" }', '{ id = "a", name = "b" }'), ENV, r"field 'audiences.0': give an audience either an id or a name"),
    (GOOD.replace('name = "acme relay"', 'name = "a,b"'), ENV, r"field 'name': must not contain a comma"),
    ("surprise = 1\n" + GOOD, ENV, r"field 'surprise': Extra inputs are not permitted"),
    (GOOD + '\nenabled = false\n', ENV, r"field 'eventhubs.enabled'.*top-level keys go before the first \[section\]"),
    ("name = [", ENV, r"is not valid TOML"),
])
def test_a_bad_destination_file_names_the_field_and_the_fix(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ProvisioningError, match=message):
        load_destination(write(tmp_path, text), env)


def test_status_and_destroy_need_no_target_secret(tmp_path: Path) -> None:
    env = {k: v for k, v in ENV.items() if k != "ADOBE_EVENTHUBS_SAS_KEY"}
    assert load_destination(write(tmp_path, GOOD), env, need_target_secrets=False).secret_values() == ["p8e-very-secret"]


def flow(audiences: list[str], paths: list[str]) -> dict:
    return {"id": "f", "transformations": [{"name": "GeneralTransform", "params": {
        "segmentSelectors": {"selectors": [{"type": "PLATFORM_SEGMENT", "value": {"id": a}} for a in audiences]},
        "profileSelectors": {"selectors": [{"type": "JSON_PATH", "value": {"operator": "EXISTS", "path": p}} for p in paths]},
    }}]}


def test_selector_patch_removes_from_the_highest_index_down_and_appends_what_is_missing() -> None:
    wanted = {i: {"id": i, "name": i.upper()} for i in ("a", "b", "c")}
    ops = selector_patch(flow(["a", "x", "b", "y"], ["p1", "old"]), wanted, ["p1", "p2"])
    assert ops == [
        {"op": "remove", "path": "/transformations/0/params/segmentSelectors/selectors/3"},
        {"op": "remove", "path": "/transformations/0/params/segmentSelectors/selectors/1"},
        {"op": "add", "path": "/transformations/0/params/segmentSelectors/selectors/-",
         "value": {"type": "PLATFORM_SEGMENT", "value": {"id": "c", "name": "C"}}},
        {"op": "remove", "path": "/transformations/0/params/profileSelectors/selectors/1"},
        {"op": "add", "path": "/transformations/0/params/profileSelectors/selectors/-",
         "value": {"type": "JSON_PATH", "value": {"operator": "EXISTS", "path": "p2"}}},
    ]
    assert selector_patch(flow(["a"], ["p"]), {"a": {"id": "a", "name": "A"}}, ["p"]) == []


def test_adobe_error_shapes_become_one_line_with_the_request_id() -> None:
    flow_error = error_from("PATCH", "https://platform.adobe.io/data/foundation/flowservice/flows/f1", 412, {
        "type": "https://ns.adobe.com/aep/errors/FLOW-1439-412", "title": "Precondition failed", "status": 412,
        "report": {"detailed-message": "Supplied version=[x] does not match", "request-id": "req-9"},
    }, {})
    assert str(flow_error) == ("PATCH /data/foundation/flowservice/flows/f1: 412 Precondition failed: Supplied version=[x] "
                               "does not match; the entity changed since it was read (etag) (request id req-9)")
    gateway = error_from("GET", "https://platform.adobe.io/data/core/ups/segment/definitions", 403,
                         {"error_code": "403003", "message": "Api Key is invalid"}, {"x-request-id": "r-1"})
    assert "403 Api Key is invalid" in str(gateway) and "(request id r-1)" in str(gateway)
    assert "check adobe.client_id" in str(gateway) and "Permissions" not in str(gateway)
    assert gateway.code == "403003"


@pytest.mark.parametrize(("body", "hint"), [
    ({"error_code": "403025", "message": "Profile is not valid"}, "check adobe.org_id"),
    ({"title": "Forbidden", "errorMessage": "Sandbox 'dve' does not exist in org X or the credential has no access"},
     "check 'sandbox' in the destination file"),
    ({"title": "Access denied", "errorMessage": "The credential lacks the permission 'Manage Destinations' in "
                                                "sandbox 'dev'."}, "Permissions → Roles → API credentials"),
])
def test_each_cause_of_a_403_gets_its_own_fix(body: dict[str, str], hint: str) -> None:
    error = str(error_from("POST", "https://platform.adobe.io/data/foundation/flowservice/flows", 403, body, {}))
    assert hint in error and error.count("; ") == 1  # one hint, not every one


def test_a_secret_is_masked_as_a_whole_token_only() -> None:
    from segment_relay.provisioning.cli import mask_secrets

    assert mask_secrets("cannot reach the hub", ["a"]) == "cannot reach the hub"
    assert mask_secrets("key a was refused", ["a"]) == "key *** was refused"
    assert mask_secrets('sasKey="Zm9v+YmFy/=" rejected, sig=Zm9v+YmFy/=&x', ["Zm9v+YmFy/="]) == \
        'sasKey="***" rejected, sig=***&x'
    assert mask_secrets("secret-longer and secret", ["secret", "secret-longer"]) == "*** and ***"


def test_run_times_are_shown_as_utc_times_not_epoch_milliseconds() -> None:
    from segment_relay.provisioning.provisioner import utc_time

    assert utc_time(1_764_885_600_000) == "2025-12-04T22:00:00Z"
    assert utc_time("1764885600000") == "2025-12-04T22:00:00Z"
    assert utc_time("2025-12-04T22:00:00Z") == "2025-12-04T22:00:00Z" and utc_time(None) is None
