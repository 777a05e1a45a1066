"""Provisioning against the local fake of Adobe IMS, Flow Service and Segmentation. Every request
the client makes and every answer is then validated against Adobe's OpenAPI specs (when the
specs are on this machine; see tests/test_platform_fake.py)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from segment_relay.provisioning.destination import Destination, load_destination
from segment_relay.provisioning.errors import ProvisioningError
from segment_relay.provisioning.provisioner import Step
from segment_relay.provisioning.retry import RetrySettings
from segment_relay.provisioning.session import provisioner_for
from segment_relay.testing.platform import DEFAULT_AUDIENCES, FakePlatform
from segment_relay.testing.platform.process import start_platform_process

A1, A2, A3 = DEFAULT_AUDIENCES[:3]
SAS_KEY = "sas-key-that-must-never-be-logged"
FAST_RETRY = RetrySettings(attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05, max_retry_after_s=0.05)



def destination_file(tmp_path: Path, fake_url: str, client_id: str, org_id: str, *,
                     audiences: list[str] | None = None, attributes: list[str] | None = None, extra: str = "") -> Path:
    audiences = [f'{{ id = "{A1.id}" }}', f'{{ name = "{A2.name}" }}'] if audiences is None else audiences
    attributes = ["person.name.lastName", "personalEmail.address"] if attributes is None else attributes
    path = tmp_path / "destination.toml"
    path.write_text(f"""
name = "segment-relay test"
sandbox = "dev"
audiences = [{", ".join(audiences)}]
attributes = {json.dumps(attributes)}
{extra}
[adobe]
org_id = "{org_id}"
client_id = "{client_id}"
ims_url = "{fake_url}"
platform_url = "{fake_url}"

[eventhubs]
namespace = "acme-ns"
hub = "exports"
sas_key_name = "adobe-send"
""")
    return path


def load(fake: FakePlatform, tmp_path: Path, **kw: Any) -> Destination:
    creds = fake.credentials
    path = destination_file(tmp_path, fake.url, creds.client_id, creds.org_id, **kw)
    return load_destination(path, {"ADOBE_CLIENT_SECRET": creds.client_secret, "ADOBE_EVENTHUBS_SAS_KEY": SAS_KEY})


async def reconcile(destination: Destination, *, apply: bool) -> list[Step]:
    async with provisioner_for(destination, retry=FAST_RETRY) as provisioner:
        return await provisioner.reconcile(apply=apply)


def actions(steps: list[Step]) -> list[tuple[str, str]]:
    return [(s.action, s.what) for s in steps]


def writes(fake: FakePlatform) -> list[str]:
    return [f"{r.method} {r.path}" for r in fake.requests if r.method in ("POST", "PATCH", "PUT", "DELETE")
            and not r.path.startswith("/ims/")]


async def test_plan_writes_nothing_apply_creates_everything_once_and_destroy_removes_it(
    fake: FakePlatform, tmp_path: Path
) -> None:
    destination = load(fake, tmp_path)
    planned = await reconcile(destination, apply=False)
    assert actions(planned) == [
        ("create", "profile base connection"), ("create", "source connection"),
        ("create", "eventhubs base connection"), ("create", "target connection"), ("create", "dataflow"),
        ("update", "audiences"), ("update", "attributes"), ("keep", "state"),  # Adobe creates it enabled
    ]
    assert writes(fake) == []

    applied = await reconcile(destination, apply=True)
    assert actions(applied) == actions(planned)  # plan says what apply does
    flows = fake.entities("flows", sandbox="dev")
    assert len(flows) == 1 and flows[0]["state"] == "enabled"
    selectors = flows[0]["transformations"][0]["params"]
    assert [s["value"]["id"] for s in selectors["segmentSelectors"]["selectors"]] == [A1.id, A2.id]
    assert [s["value"]["path"] for s in selectors["profileSelectors"]["selectors"]] == [
        "person.name.lastName", "personalEmail.address"]
    base = next(c for c in fake.entities("connections", sandbox="dev") if c["name"].endswith("Azure Event Hubs"))
    assert base["auth"]["specName"] == "Azure EventHub authentication credentials"  # read from the connection spec

    fake.clear_requests()
    again = await reconcile(destination, apply=True)
    assert {s.action for s in again} == {"keep"}
    assert writes(fake) == []  # a second apply changes nothing

    async with provisioner_for(destination, retry=FAST_RETRY) as provisioner:
        status = await provisioner.status()
        assert status["flow"]["state"] == "enabled"
        assert [a["id"] for a in status["audiences"]] == [A1.id, A2.id]
        removed = await provisioner.destroy(apply=True)
    assert [s.what for s in removed if s.action == "delete"] == [
        "dataflow", "target connection", "source connection", "eventhubs base connection", "profile base connection"]
    assert all(not fake.entities(kind, sandbox="dev") for kind in ("flows", "connections", "targetConnections"))


async def test_drifted_selectors_and_target_params_are_repaired(fake: FakePlatform, tmp_path: Path) -> None:
    await reconcile(load(fake, tmp_path), apply=True)
    # Someone edits the destination in the UI: another audience, one removed, an attribute dropped.
    changed = load(fake, tmp_path, audiences=[f'{{ id = "{A1.id}" }}', f'{{ id = "{A3.id}" }}'],
                   attributes=["personalEmail.address"])
    planned = await reconcile(changed, apply=False)
    audiences = next(s for s in planned if s.what == "audiences")
    assert audiences.action == "update" and f"+{A3.name} ({A3.id})" in audiences.detail and f"-{A2.id}" in audiences.detail
    await reconcile(changed, apply=True)
    flow = fake.entities("flows", sandbox="dev")[0]
    params = flow["transformations"][0]["params"]
    assert [s["value"]["id"] for s in params["segmentSelectors"]["selectors"]] == [A1.id, A3.id]
    assert [s["value"]["path"] for s in params["profileSelectors"]["selectors"]] == ["personalEmail.address"]

    target_file = destination_file(tmp_path, fake.url, fake.credentials.client_id, fake.credentials.org_id)
    target_file.write_text(target_file.read_text().replace('hub = "exports"', 'hub = "exports-v2"'))
    retargeted = load_destination(target_file, {"ADOBE_CLIENT_SECRET": fake.credentials.client_secret,
                                                "ADOBE_EVENTHUBS_SAS_KEY": SAS_KEY})
    steps = await reconcile(retargeted, apply=True)
    assert ("update", "target connection") in actions(steps)
    assert fake.entities("targetConnections", sandbox="dev")[0]["params"]["eventHubName"] == "exports-v2"


async def test_a_stale_etag_throttling_and_server_errors_are_recovered(fake: FakePlatform, tmp_path: Path) -> None:
    fake.inject(429, times=2, method="GET", retry_after=0)
    fake.inject(500, times=1, method="POST", path=r"/flowservice/connections$")
    fake.inject(503, times=1, method="POST", path=r"/flowservice/flows$", retry_after=0)
    fake.inject(412, times=1, method="PATCH", path=r"/flows/")  # someone changed the flow after our read
    await reconcile(load(fake, tmp_path), apply=True)
    assert len(fake.entities("connections", sandbox="dev")) == 2  # no duplicate from the retried create
    assert len(fake.entities("flows", sandbox="dev")) == 1
    flow = fake.entities("flows", sandbox="dev")[0]
    assert len(flow["transformations"][0]["params"]["segmentSelectors"]["selectors"]) == 2
    assert len(fake.requests_to("PATCH", r"/flows/")) == 2  # the 412, then the retry with a fresh etag


async def test_a_missing_permission_and_an_unknown_audience_fail_with_the_fix(fake: FakePlatform, tmp_path: Path) -> None:
    fake.deny("Manage Destinations")
    with pytest.raises(ProvisioningError, match=r"403 .*Manage Destinations.*Permissions → Roles") as denied:
        await reconcile(load(fake, tmp_path), apply=True)
    assert "\n" not in str(denied.value)
    fake.allow()
    with pytest.raises(ProvisioningError, match=r"audience 'no-such-id' does not exist in sandbox 'dev'"):
        await reconcile(load(fake, tmp_path, audiences=['{ id = "no-such-id" }']), apply=False)
    with pytest.raises(ProvisioningError, match=r"no audience is named 'Nobody' in sandbox 'dev'"):
        await reconcile(load(fake, tmp_path, audiences=['{ name = "Nobody" }']), apply=False)


def test_the_cli_plans_applies_reports_and_destroys_and_never_prints_a_secret(tmp_path: Path) -> None:
    secret = "cli-client-secret-never-printed"
    platform = start_platform_process("--no-exports", env={"SEGMENT_RELAY_FAKE_CLIENT_SECRET": secret})
    try:
        ready = platform.ready
        path = destination_file(tmp_path, platform.url, ready["client_id"], ready["org_id"])
        env = {**os.environ, "ADOBE_CLIENT_SECRET": secret, "ADOBE_EVENTHUBS_SAS_KEY": SAS_KEY}

        def cli(*args: str, secret_env: str = secret) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "segment_relay.cli", "provision", *args, str(path)],
                                  env={**env, "ADOBE_CLIENT_SECRET": secret_env}, capture_output=True, text=True,
                                  timeout=60)

        plan = cli("plan", "--json")
        assert plan.returncode == 0, plan.stderr
        assert json.loads(plan.stdout)["changes"] == 7
        applied = cli("apply")
        assert applied.returncode == 0, applied.stderr
        assert "create" in applied.stderr and "dataflow: segment-relay test" in applied.stderr
        status = cli("status", "--json")
        assert json.loads(status.stdout)["flow"]["state"] == "enabled"
        status_text = cli("status")
        assert "activated audiences" in status_text.stdout and A1.id in status_text.stdout
        refused = cli("destroy", "--json")
        assert refused.returncode == 1 and "--yes" in refused.stderr
        destroyed = cli("destroy", "--yes", "--json")
        assert destroyed.returncode == 0, destroyed.stderr
        assert json.loads(destroyed.stdout)["counts"] == {"delete": 5}

        wrong = cli("plan", secret_env="a-wrong-secret")
        assert wrong.returncode == 1
        assert wrong.stderr.count("\n") == 1 and "Adobe IMS refused the client credentials" in wrong.stderr
        assert "$ADOBE_CLIENT_SECRET" in wrong.stderr and "a-wrong-secret" not in wrong.stderr
        for run in (plan, applied, status, status_text, refused, destroyed, wrong):
            for value in (secret, SAS_KEY):
                assert value not in run.stdout + run.stderr
        assert secret not in platform.log() and SAS_KEY not in platform.log()
    finally:
        platform.stop()


async def test_no_secret_reaches_any_log_line(fake: FakePlatform, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every library at its most talkative
    destination = load(fake, tmp_path)
    await reconcile(destination, apply=True)
    async with provisioner_for(destination, retry=FAST_RETRY) as provisioner:
        await provisioner.status()
        await provisioner.destroy(apply=True)
    captured = caplog.text + "".join(repr(r.__dict__) for r in caplog.records)
    assert caplog.records  # the check below looked at something
    for secret in (fake.credentials.client_secret, SAS_KEY):
        assert secret not in captured


async def test_the_ims_token_is_cached_and_renewed_before_it_expires(fake: FakePlatform) -> None:
    import aiohttp
    from pydantic import SecretStr

    from segment_relay.provisioning.ims import ImsClient

    async with aiohttp.ClientSession() as session:
        creds = fake.credentials
        ims = ImsClient(session, client_id=creds.client_id, client_secret=SecretStr(creds.client_secret),
                        ims_url=fake.url, refresh_margin_s=60)
        first = await ims.token()
        assert await ims.token() == first and ims.tokens_issued == 1  # cached
        fake.token_ttl_s = 30  # shorter than the margin: every token is already due for renewal
        ims.invalidate()
        await ims.token()
        await ims.token()
        assert ims.tokens_issued == 3
        assert "secret" not in repr(ims).lower()


async def test_list_filters_hold_on_every_page_whatever_the_next_links_carry(fake: FakePlatform, tmp_path: Path) -> None:
    from segment_relay.provisioning.flow_service import EVENT_HUBS_SPEC, PROFILE_SOURCE_SPEC
    from segment_relay.testing.platform import EVENT_HUBS_AUTH_SPEC

    async with provisioner_for(load(fake, tmp_path), retry=FAST_RETRY) as provisioner:
        flows = provisioner.flows
        for n in range(10):  # the oldest: listed last, on page 2, where a dropped filter lets them in
            await flows.create("connections", {"name": f"hub {n}", "connectionSpec": {"id": EVENT_HUBS_SPEC, "version": "1.0"},
                                               "auth": {"specName": EVENT_HUBS_AUTH_SPEC, "params": {
                                                   "sasKeyName": "k", "sasKey": SAS_KEY, "namespace": "ns"}}})
        for n in range(120):  # more than a page of 100
            await flows.create("connections", {"name": f"profiles {n}",
                                               "connectionSpec": {"id": PROFILE_SOURCE_SPEC, "version": "1.0"}})
        found = await flows.find("connections", connectionSpec__id=PROFILE_SOURCE_SPEC)
        assert len(found) == 120 and {c["connectionSpec"]["id"] for c in found} == {PROFILE_SOURCE_SPEC}
        assert len(await flows.find("connections", connectionSpec__id=EVENT_HUBS_SPEC)) == 10
    second_pages = [r for r in fake.requests_to("GET", r"/flowservice/connections$")
                    if any(k == "continuationToken" for k, _ in r.query)]
    assert second_pages and all(("property", f"connectionSpec.id=={PROFILE_SOURCE_SPEC}") in r.query
                                for r in second_pages)


_FAKES = {"as documented": {}, "202 patches, 204 deletes": {"patch_status": 202, "delete_status": 204},
          "throttling": {"throttle_rate": 0.25, "seed": 3}, "SAS auth offered": {"eventhubs_sas_auth": True}}
_FILES = {
    "event hubs": {},
    "disabled, toggles set": {"extra": "enabled = false\ninclude_segment_names = true\ninclude_segment_timestamps = false"},
    "kinesis": {"kinesis": True},
    "hub-scoped key": {"replace": ('hub = "exports"', 'hub = "exports"\nhub_scoped_key = true')},
    "uploaded audience": {"audiences": ['{ name = "CRM upload" }']},
}


@pytest.mark.parametrize("file_kind", list(_FILES))
@pytest.mark.parametrize("fake_kind", list(_FAKES))
async def test_applying_any_destination_file_twice_writes_nothing_the_second_time(
        tmp_path: Path, fake_kind: str, file_kind: str) -> None:
    from segment_relay.testing.platform import Audience

    if file_kind == "hub-scoped key" and fake_kind != "SAS auth offered":
        pytest.skip("a hub-scoped key needs the SAS auth spec (see the test of its error)")
    how = _FILES[file_kind]
    async with FakePlatform(**_FAKES[fake_kind]) as fake:
        fake.add_audiences([Audience(id="6c1d2e3f-0a4b-4c5d-8e6f-7a8b9c0d1e2f", name="CRM upload",
                                     external_id="crm-42", namespace="AAMSegments")])
        creds = fake.credentials
        path = destination_file(tmp_path, fake.url, creds.client_id, creds.org_id, extra=how.get("extra", ""),
                                audiences=how.get("audiences"))
        text = path.read_text()
        if how.get("kinesis"):
            text = text[:text.index("[eventhubs]")] + '[kinesis]\nstream = "exports"\nregion = "us-east-1"\n'
        if "replace" in how:
            text = text.replace(*how["replace"])
        path.write_text(text)
        destination = load_destination(path, {"ADOBE_CLIENT_SECRET": creds.client_secret,
                                              "ADOBE_EVENTHUBS_SAS_KEY": SAS_KEY,
                                              "ADOBE_KINESIS_ACCESS_KEY_ID": "AKIAEXAMPLE",
                                              "ADOBE_KINESIS_SECRET_KEY": "kinesis-secret-never-logged"})
        await reconcile(destination, apply=True)
        fake.clear_requests()
        again = await reconcile(destination, apply=True)
        assert {s.action for s in again} == {"keep"}, [(s.action, s.what, s.detail) for s in again]
        assert writes(fake) == []
