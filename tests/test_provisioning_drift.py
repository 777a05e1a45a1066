"""Drift: what someone changed in Adobe's UI, or what the destination file now says differently,
shown field by field by `plan` and repaired by `apply` with the narrowest patch, leaving what the
file does not declare alone; adoption of a destination made in the UI (issue 14, points 2 to 5).

Driven through the CLI (`segment-relay provision ... --json`) against the fake running on a
thread of its own (``platform_in_thread``)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import platform_in_thread
from test_platform_fake import A1, A2, SPECS, Api, validate_against_specs
from test_platform_fake import SAS_KEY as UI_SAS_KEY
from test_platform_fake import provision as made_in_the_ui
from test_provisioning import SAS_KEY, destination_file, writes
from typer.testing import CliRunner

from segment_relay.cli import app
from segment_relay.provisioning.provisioner import Step
from segment_relay.testing.platform import ExportSettings, FakePlatform

AWS_KEY_ID, AWS_SECRET = "AKIAEXAMPLEKEYID0001", "aws-secret-key-that-must-never-be-logged"


@pytest.fixture
def fake(fake_in_thread: FakePlatform) -> Iterator[FakePlatform]:
    yield fake_in_thread
    if SPECS:  # every request and answer still as Adobe's specs say (the patches narrowed, too)
        validate_against_specs(fake_in_thread.requests)


def environ(fake: FakePlatform, **overrides: str) -> dict[str, str]:
    return {"ADOBE_CLIENT_SECRET": fake.credentials.client_secret, "ADOBE_EVENTHUBS_SAS_KEY": SAS_KEY,
            "ADOBE_KINESIS_ACCESS_KEY_ID": AWS_KEY_ID, "ADOBE_KINESIS_SECRET_KEY": AWS_SECRET, **overrides}


def eventhubs_file(fake: FakePlatform, tmp_path: Path, *, extra: str = "", **replacements: str) -> Path:
    path = destination_file(tmp_path, fake.url, fake.credentials.client_id, fake.credentials.org_id, extra=extra)
    text = path.read_text()
    for old, new in replacements.items():
        text = text.replace(old, new)
    path.write_text(text)
    return path


def kinesis_file(fake: FakePlatform, tmp_path: Path, region: str) -> Path:
    path = destination_file(tmp_path, fake.url, fake.credentials.client_id, fake.credentials.org_id)
    text = path.read_text()
    text = text[:text.index("[eventhubs]")] + f'[kinesis]\nstream = "exports"\nregion = "{region}"\n'
    path.write_text(text)
    return path


def cli(fake: FakePlatform, path: Path, command: str, *flags: str, **env: str) -> dict[str, Any]:
    """``segment-relay provision COMMAND --json FLAGS PATH``: its JSON document."""
    result = CliRunner().invoke(app, ["provision", command, "--json", *flags, str(path)], env=environ(fake, **env))
    assert result.exit_code == 0, result.output
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def reconcile(path: Path, fake: FakePlatform, *, apply: bool = True, update_credentials: bool = False,
              **env: str) -> list[Step]:
    flags = ("--update-credentials",) if update_credentials else ()
    return [Step(**step) for step in cli(fake, path, "apply" if apply else "plan", *flags, **env)["steps"]]


def step(steps: list[Step], what: str) -> Step:
    return next(s for s in steps if s.what == what)


def one(fake: FakePlatform, kind: str, suffix: str = "") -> dict[str, Any]:
    found = [e for e in fake.entities(kind, sandbox="dev") if e["name"].endswith(suffix)]
    assert len(found) == 1, found
    return found[0]


def edit_in_the_ui(fake: FakePlatform, kind: str, entity: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    """What Adobe's UI does: a JSON Patch with the entity's etag, by another client."""
    async def patch() -> None:
        url = f"{fake.flow_service_url}/{kind}/{entity['id']}"
        async with aiohttp.ClientSession() as session:
            async with session.patch(url, json=ops, headers={**fake.headers("dev"), "If-Match": entity["etag"]}) as answer:
                assert answer.status == 200, await answer.text()

    asyncio.run(patch())


def test_a_toggle_set_in_the_ui_survives_an_apply_that_repairs_another_param(
        fake: FakePlatform, tmp_path: Path) -> None:
    reconcile(eventhubs_file(fake, tmp_path), fake)
    target = one(fake, "targetConnections")
    edit_in_the_ui(fake, "targetConnections", target,
                         [{"op": "add", "path": "/params/includeSegmentNames", "value": True}])

    moved = eventhubs_file(fake, tmp_path, **{'hub = "exports"': 'hub = "exports-v2"'})
    planned = reconcile(moved, fake, apply=False)
    assert step(planned, "target connection").detail == 'eventHubName: "exports" -> "exports-v2"'
    fake.clear_requests()
    applied = reconcile(moved, fake)
    assert [(s.action, s.what, s.detail) for s in applied] == [(s.action, s.what, s.detail) for s in planned]
    assert one(fake, "targetConnections")["params"] == {"eventHubName": "exports-v2", "includeSegmentNames": True}
    patches = fake.requests_to("PATCH", r"/targetConnections/")
    assert [r.body for r in patches] == [[{"op": "replace", "path": "/params/eventHubName", "value": "exports-v2"}]]

    fake.clear_requests()
    assert {s.action for s in reconcile(moved, fake)} == {"keep"}
    assert writes(fake) == []


def test_the_export_toggles_are_destination_file_fields(fake: FakePlatform, tmp_path: Path) -> None:
    both_on = "include_segment_names = true\ninclude_segment_timestamps = true"
    reconcile(eventhubs_file(fake, tmp_path, extra=both_on), fake)
    assert one(fake, "targetConnections")["params"] == {
        "eventHubName": "exports", "includeSegmentNames": True, "includeSegmentTimestamps": True}

    names_off = eventhubs_file(fake, tmp_path, extra="include_segment_names = false")  # timestamps: left alone
    planned = reconcile(names_off, fake, apply=False)
    assert step(planned, "target connection").detail == "includeSegmentNames: true -> false"
    reconcile(names_off, fake)
    assert one(fake, "targetConnections")["params"] == {
        "eventHubName": "exports", "includeSegmentNames": False, "includeSegmentTimestamps": True}
    fake.clear_requests()
    reconcile(names_off, fake)
    assert writes(fake) == []


def test_a_rotated_secret_is_sent_with_update_credentials_and_never_shown(
        fake: FakePlatform, tmp_path: Path) -> None:
    path = eventhubs_file(fake, tmp_path)
    reconcile(path, fake)
    rotated = "the-rotated-sas-key-never-logged"
    # Adobe never shows a secret: without the flag a new one cannot be seen to differ.
    assert step(reconcile(path, fake, apply=False, ADOBE_EVENTHUBS_SAS_KEY=rotated),
                "eventhubs base connection").action == "keep"
    planned = reconcile(path, fake, apply=False, update_credentials=True, ADOBE_EVENTHUBS_SAS_KEY=rotated)
    base = step(planned, "eventhubs base connection")
    assert (base.action, base.detail) == ("update", "sasKey: from $ADOBE_EVENTHUBS_SAS_KEY")
    reconcile(path, fake, update_credentials=True, ADOBE_EVENTHUBS_SAS_KEY=rotated)
    stored = fake.flow_service.raw("dev", "connections", one(fake, "connections", "Azure Event Hubs")["id"])
    assert stored is not None and stored["auth"]["params"]["sasKey"] == rotated
    assert all(rotated not in json.dumps(r.body) for r in fake.requests)  # the fake's record is redacted too


def test_a_region_change_moves_the_credentials_and_the_target(fake: FakePlatform, tmp_path: Path) -> None:
    reconcile(kinesis_file(fake, tmp_path, "us-east-1"), fake)
    moved = kinesis_file(fake, tmp_path, "eu-west-1")
    planned = reconcile(moved, fake, apply=False)
    assert step(planned, "kinesis base connection").detail == 'region: "us-east-1" -> "eu-west-1"'
    assert step(planned, "target connection").detail == 'region: "us-east-1" -> "eu-west-1"'
    reconcile(moved, fake)
    assert one(fake, "connections", "Amazon Kinesis")["auth"]["params"]["region"] == "eu-west-1"
    assert one(fake, "targetConnections")["params"] == {"stream": "exports", "region": "eu-west-1"}
    fake.clear_requests()
    reconcile(moved, fake)
    assert writes(fake) == []


def test_event_hubs_namespace_policy_and_hub_scoped_key_changes_are_repaired(tmp_path: Path) -> None:
    with platform_in_thread(eventhubs_sas_auth=True) as fake:
        _repairs_event_hubs_auth(fake, tmp_path)


def test_a_hub_scoped_key_without_an_auth_spec_for_it_says_what_to_do(
        fake: FakePlatform, tmp_path: Path) -> None:
    path = eventhubs_file(fake, tmp_path, **{'sas_key_name = "adobe-send"': 'sas_key_name = "x"\nhub_scoped_key = true'})
    result = CliRunner().invoke(app, ["provision", "plan", str(path)], env=environ(fake))
    assert result.exit_code == 1 and re.search("hub_scoped_key: .* set hub_scoped_key = false", result.output)


def _repairs_event_hubs_auth(fake: FakePlatform, tmp_path: Path) -> None:
    reconcile(eventhubs_file(fake, tmp_path), fake)
    changed = eventhubs_file(fake, tmp_path, **{'namespace = "acme-ns"': 'namespace = "acme-ns-2"',
                                                'sas_key_name = "adobe-send"': 'sas_key_name = "adobe-send-2"\n'
                                                                               'hub_scoped_key = true'})
    planned = reconcile(changed, fake, apply=False)
    detail = step(planned, "eventhubs base connection").detail
    for change in ('sasKeyName: "adobe-send" -> "adobe-send-2"', 'namespace: "acme-ns" -> "acme-ns-2"',
                   'eventHubName: (unset) -> "exports"', "auth spec: "):
        assert change in detail
    reconcile(changed, fake)
    auth = one(fake, "connections", "Azure Event Hubs")["auth"]
    assert auth["params"]["namespace"] == "acme-ns-2" and auth["params"]["eventHubName"] == "exports"
    fake.clear_requests()
    reconcile(changed, fake)
    assert writes(fake) == []

    back = eventhubs_file(fake, tmp_path)  # a namespace key again: the hub leaves the credentials
    reconcile(back, fake)
    assert "eventHubName" not in one(fake, "connections", "Azure Event Hubs")["auth"]["params"]
    stored = fake.flow_service.raw("dev", "connections", one(fake, "connections", "Azure Event Hubs")["id"])
    assert stored is not None and stored["auth"]["params"]["sasKey"] == SAS_KEY  # never re-sent, still there


def test_a_dataflow_declared_disabled_is_disabled_before_any_audience_is_mapped_and_never_exports(
        tmp_path: Path) -> None:
    with platform_in_thread(exports=ExportSettings(records=10)) as fake:
        _disabled_from_the_start(fake, tmp_path)


def _disabled_from_the_start(fake: FakePlatform, tmp_path: Path) -> None:
    path = eventhubs_file(fake, tmp_path, **{'sandbox = "dev"': 'sandbox = "dev"\nenabled = false'})
    planned = reconcile(path, fake, apply=False)
    applied = reconcile(path, fake)
    assert [(s.action, s.what) for s in applied] == [(s.action, s.what) for s in planned]
    assert ("disable", "state") in [(s.action, s.what) for s in applied]
    assert step(applied, "state").detail == 'state: "enabled" -> "disabled"'  # a field-level diff, like the others
    flow_writes = [(r.method, r.path.rsplit("/", 1)[-1], dict(r.query).get("op"))
                   for r in fake.requests if r.method in ("POST", "PATCH") and "/flowservice/flows" in r.path]
    assert [method for method, _, _ in flow_writes] == ["POST", "POST", "PATCH"]  # create, disable, then map
    assert flow_writes[1][2] == "disable"
    assert one(fake, "flows")["state"] == "disabled"
    assert one(fake, "flows")["id"] not in fake.simulations  # no export (no backfill) was ever started


def test_plan_detailed_exitcode_tells_ci_whether_anything_would_change(fake: FakePlatform, tmp_path: Path) -> None:
    path = eventhubs_file(fake, tmp_path)

    def provision(*args: str) -> int:
        return CliRunner().invoke(app, ["provision", *args, str(path)], env=environ(fake)).exit_code

    assert provision("plan", "--detailed-exitcode") == 2
    assert provision("plan") == 0  # without the flag a pending change is no error
    assert provision("apply") == 0
    assert provision("plan", "--detailed-exitcode") == 0
    path.write_text("not toml [")
    assert provision("plan", "--detailed-exitcode") == 1


def test_status_shows_run_times_as_utc_times(fake: FakePlatform, tmp_path: Path) -> None:
    path = eventhubs_file(fake, tmp_path)
    reconcile(path, fake)
    fake.advance_clock(2 * 3600)  # two hourly streaming runs
    report = cli(fake, path, "status")
    assert report["runs"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", str(run["started"])) for run in report["runs"])
    table = CliRunner().invoke(app, ["provision", "status", str(path)], env=environ(fake))
    assert table.exit_code == 0 and report["runs"][0]["started"][:10] in table.stdout
    assert not re.search(r"\b\d{13}\b", table.stdout)  # no epoch milliseconds


def test_an_uploaded_audience_is_selected_the_way_adobe_selects_external_audiences(
        fake: FakePlatform, tmp_path: Path) -> None:
    from segment_relay.testing.platform import Audience

    uploaded = Audience(id="5b3e1c2a-0f4d-4e8b-9a61-7c2d3e4f5a6b", name="CRM upload: churn risk",
                        external_id="crm-churn-2026", namespace="AAMSegments")
    fake.add_audiences([uploaded])
    for ref in (f'{{ id = "{uploaded.id}" }}', f'{{ name = "{uploaded.name}" }}'):
        path = destination_file(tmp_path, fake.url, fake.credentials.client_id, fake.credentials.org_id,
                                audiences=[ref])
        reconcile(path, fake)
        selectors = one(fake, "flows")["transformations"][0]["params"]["segmentSelectors"]["selectors"]
        assert len(selectors) == 1
        value = selectors[0]["value"]
        assert (value["id"], value["systemSegmentId"], value["namespace"]) == (
            "crm-churn-2026", uploaded.id, "AAMSegments")
        fake.clear_requests()
        assert {s.action for s in reconcile(path, fake)} == {"keep"}
        assert writes(fake) == []


def test_an_audience_name_is_found_past_the_first_page_of_substring_matches(
        fake: FakePlatform, tmp_path: Path) -> None:
    from segment_relay.testing.platform import Audience

    # 130 uploaded audiences whose names all contain "Churn": the exact one sorts last.
    fake.add_audiences([Audience(id=f"00000000-0000-4000-8000-{n:012d}", name=f"Big Churn {n:03d}",
                                 external_id=f"churn-{n}", namespace="AAMSegments") for n in range(130)])
    fake.add_audiences([Audience(id="00000000-0000-4000-8000-999999999999", name="Churn", external_id="churn",
                                 namespace="AAMSegments")])
    path = destination_file(tmp_path, fake.url, fake.credentials.client_id, fake.credentials.org_id,
                            audiences=['{ name = "Churn" }'])
    reconcile(path, fake)
    selectors = one(fake, "flows")["transformations"][0]["params"]["segmentSelectors"]["selectors"]
    assert [s["value"]["id"] for s in selectors] == ["churn"]


def test_a_destination_made_in_the_ui_is_adopted_by_dataflow_id_or_name(
        fake: FakePlatform, tmp_path: Path) -> None:
    async def by_hand() -> Any:
        async with aiohttp.ClientSession() as session:
            return await made_in_the_ui(Api(fake, session, sandbox="dev"), name="Acme exports", audiences=(A1, A2),
                                        attributes=("person.name.lastName", "personalEmail.address"))

    ui = asyncio.run(by_hand())
    before = {kind: len(fake.entities(kind, sandbox="dev")) for kind in ("connections", "sourceConnections",
                                                                         "targetConnections", "flows")}
    same_target = {'namespace = "acme-ns"': 'namespace = "127.0.0.1:5673"',
                   'sas_key_name = "adobe-send"': 'sas_key_name = "RootManageSharedAccessKey"'}
    by_id = eventhubs_file(fake, tmp_path, **same_target,
                           **{'name = "segment-relay test"': f'name = "Acme exports"\ndataflow_id = "{ui.flow}"'})
    by_name = eventhubs_file(fake, tmp_path, **same_target, **{'name = "segment-relay test"': 'name = "Acme exports"'})
    for path in (by_id, by_name):
        fake.clear_requests()
        steps = reconcile(path, fake, ADOBE_EVENTHUBS_SAS_KEY=UI_SAS_KEY)
        assert {s.action for s in steps} == {"keep"}, [(s.action, s.what, s.detail) for s in steps]
        assert {s.id for s in steps if s.what.endswith("connection")} >= {ui.target, ui.source, ui.base, ui.profile_base}
        assert writes(fake) == []
    assert {kind: len(fake.entities(kind, sandbox="dev")) for kind in before} == before  # nothing made anew

    moved = eventhubs_file(fake, tmp_path, **same_target, **{'hub = "exports"': 'hub = "exports-v2"',
                                                             'name = "segment-relay test"': 'name = "Acme exports"'})
    target = step(reconcile(moved, fake, ADOBE_EVENTHUBS_SAS_KEY=UI_SAS_KEY), "target connection")
    assert (target.action, target.name, target.id) == ("update", "Acme exports target", ui.target)

    renamed = eventhubs_file(fake, tmp_path, **same_target,
                             **{'name = "segment-relay test"': f'name = "Acme relay"\ndataflow_id = "{ui.flow}"'})
    flow = step(reconcile(renamed, fake, ADOBE_EVENTHUBS_SAS_KEY=UI_SAS_KEY), "dataflow")
    assert (flow.action, flow.detail) == ("update", 'name: "Acme exports" -> "Acme relay"')

    removed = [Step(**s) for s in cli(fake, renamed, "destroy", "--yes", ADOBE_EVENTHUBS_SAS_KEY=UI_SAS_KEY)["steps"]]
    assert {s.id for s in removed if s.action == "delete"} == {ui.flow, ui.target, ui.source, ui.base, ui.profile_base}
    assert all(not fake.entities(kind, sandbox="dev") for kind in before)


def test_a_dataflow_id_that_does_not_exist_says_so(fake: FakePlatform, tmp_path: Path) -> None:
    path = eventhubs_file(fake, tmp_path, **{'name = "segment-relay test"':
                                             'name = "x"\ndataflow_id = "00000000-0000-0000-0000-000000000000"'})
    result = CliRunner().invoke(app, ["provision", "plan", str(path)], env=environ(fake))
    assert result.exit_code == 1
    assert "dataflow_id '00000000-0000-0000-0000-000000000000' is not a dataflow" in result.output


def test_a_throttling_adobe_changes_nothing_of_the_outcome(tmp_path: Path) -> None:
    with platform_in_thread(throttle_rate=0.3, seed=5) as fake:
        path = eventhubs_file(fake, tmp_path)
        reconcile(path, fake)
        assert fake.faults.throttled > 0
        assert {kind: len(fake.entities(kind, sandbox="dev")) for kind in (
            "connections", "sourceConnections", "targetConnections", "flows")} == {
            "connections": 2, "sourceConnections": 1, "targetConnections": 1, "flows": 1}
        fake.clear_requests()
        assert {s.action for s in reconcile(path, fake)} == {"keep"}
        assert writes(fake) == []
