"""What `segment-relay provision` says when it cannot go on: one line, the cause, the fix, and
never a secret, driven through the CLI against the fake (issue 14, point 6)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_provisioning import SAS_KEY, destination_file
from typer.testing import CliRunner

from segment_relay.cli import app
from segment_relay.testing.platform import FakePlatform


def provision(fake: FakePlatform, path: Path, *args: str, sas_key: str = SAS_KEY) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["provision", *args, str(path)], env={
        "ADOBE_CLIENT_SECRET": fake.credentials.client_secret, "ADOBE_EVENTHUBS_SAS_KEY": sas_key})
    return result.exit_code, result.output


@pytest.mark.parametrize("cause", ["org", "sandbox", "permission"])
def test_each_cause_of_a_403_is_named_with_its_own_fix(fake_in_thread: FakePlatform, tmp_path: Path,
                                                        cause: str) -> None:
    fake = fake_in_thread
    org_id = "FFFFFFFFFFFFFFFFFFFFFFFF@AdobeOrg" if cause == "org" else fake.credentials.org_id
    path = destination_file(tmp_path, fake.url, fake.credentials.client_id, org_id)
    if cause == "sandbox":
        fake.sandbox_names = {"prod"}  # the file's "dev" does not exist in this org
    if cause == "permission":
        fake.deny("Manage Destinations")
    # A two-letter SAS key: masking it must not garble the message ("n***" for "not").
    code, output = provision(fake, path, "apply", sas_key="ot")
    assert code == 1 and output.count("\n") == 1 and "Traceback" not in output
    assert " 403 " in output
    hint = {"org": "check adobe.org_id", "sandbox": "check 'sandbox' in the destination file",
            "permission": "Permissions → Roles → API credentials"}[cause]
    assert hint in output
    for other, words in {"org": "check adobe.org_id", "sandbox": "check 'sandbox'",
                         "permission": "add the API credential to a role"}.items():
        if other != cause:
            assert words not in output
    assert "***" not in output  # nothing secret in it, and nothing masked by mistake


def test_a_bad_org_id_is_explained_in_words(fake_in_thread: FakePlatform, tmp_path: Path) -> None:
    fake = fake_in_thread
    path = destination_file(tmp_path, fake.url, fake.credentials.client_id, "0123456789ABCDEF")
    code, output = provision(fake, path, "plan")
    assert code == 1
    assert "field 'adobe.org_id': '0123456789ABCDEF' is not an IMS organization id" in output
    assert "@AdobeOrg$" not in output and "pattern" not in output


def test_an_audience_of_another_sandbox_is_not_found_in_this_one(fake_in_thread: FakePlatform, tmp_path: Path) -> None:
    from segment_relay.testing.platform import Audience

    fake = fake_in_thread
    elsewhere = Audience(id="7d8e9f00-1a2b-4c3d-8e4f-5a6b7c8d9e0f", name="Prod only")
    fake.add_audiences([elsewhere], sandbox="prod")  # the file's sandbox is "dev"
    for ref in (f'{{ id = "{elsewhere.id}" }}', '{ name = "Prod only" }'):
        path = destination_file(tmp_path, fake.url, fake.credentials.client_id, fake.credentials.org_id,
                                audiences=[ref])
        code, output = provision(fake, path, "plan")
        assert code == 1 and "in sandbox 'dev'" in output, output
