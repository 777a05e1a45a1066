"""Provisioning when Adobe is slow, drops calls or answers what it should not: a call that timed
out is never simply sent again when sending it twice could do it twice (issue 14, point 1).

The CLI tests run the fake platform on a loop in a thread of this process (``fake_in_thread``), so
that a test can change its latency between commands; the CLI runs as a user runs it
(`segment-relay provision ...`), with its own event loop and its default retry policy."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest
from test_provisioning import FAST_RETRY, SAS_KEY, destination_file, load, writes
from typer.testing import CliRunner

from segment_relay.cli import app
from segment_relay.provisioning.destination import Destination, load_destination
from segment_relay.provisioning.errors import ProvisioningError
from segment_relay.provisioning.provisioner import Step
from segment_relay.provisioning.session import provisioner_for
from segment_relay.testing.platform import FakePlatform

CREATES = r"/flowservice/(connections|sourceConnections|targetConnections|flows)$"
KINDS = ("connections", "sourceConnections", "targetConnections", "flows")
TIMEOUT_S = 0.3  # the client's timeout for one call in these tests
LATE_S = 0.8  # an answer this late has timed out


async def reconcile(destination: Destination, *, apply: bool = True) -> list[Step]:
    async with provisioner_for(destination, retry=FAST_RETRY, timeout_s=TIMEOUT_S) as provisioner:
        return await provisioner.reconcile(apply=apply)


def counts(fake: FakePlatform) -> dict[str, int]:
    return {kind: len(fake.entities(kind, sandbox="dev")) for kind in KINDS}


EVERYTHING_ONCE = {"connections": 2, "sourceConnections": 1, "targetConnections": 1, "flows": 1}



async def test_every_create_that_times_out_after_adobe_made_it_is_adopted_not_repeated(
        fake: FakePlatform, tmp_path: Path) -> None:
    fake.add_latency(LATE_S, method="POST", path=CREATES, answer_only=True)  # done, answered too late
    steps = await reconcile(load(fake, tmp_path))
    assert [s.action for s in steps[:5]] == ["create"] * 5
    assert counts(fake) == EVERYTHING_ONCE
    assert len(fake.requests_to("POST", CREATES)) == 5  # each sent once
    flow = fake.entities("flows", sandbox="dev")[0]
    assert flow["state"] == "enabled"
    assert steps[4].id == flow["id"]  # the adopted id is the one Adobe made

    fake.clear_faults()
    fake.clear_requests()
    assert {s.action for s in await reconcile(load(fake, tmp_path))} == {"keep"}
    assert writes(fake) == []


async def test_a_create_still_under_way_when_the_client_gives_up_is_waited_for(
        fake: FakePlatform, tmp_path: Path) -> None:
    # The case: Adobe takes longer than the client's timeout to make the flow, on every
    # try. Sending it again would make a second flow a moment later.
    fake.add_latency(LATE_S, method="POST", path=r"/flowservice/flows$")
    await reconcile(load(fake, tmp_path))
    assert counts(fake) == EVERYTHING_ONCE
    assert len(fake.requests_to("POST", r"/flowservice/flows$")) == 1
    fake.clear_faults()
    fake.clear_requests()
    assert {s.action for s in await reconcile(load(fake, tmp_path))} == {"keep"}


async def test_a_create_that_never_arrived_is_sent_again(fake: FakePlatform, tmp_path: Path) -> None:
    fake.inject(502, times=1, method="POST", path=r"/flowservice/targetConnections$")
    await reconcile(load(fake, tmp_path))
    assert counts(fake) == EVERYTHING_ONCE
    assert len(fake.requests_to("POST", r"/flowservice/targetConnections$")) == 2


async def test_every_patch_that_times_out_or_fails_is_read_again_before_anything_is_resent(
        fake: FakePlatform, tmp_path: Path) -> None:
    await reconcile(load(fake, tmp_path))
    path = destination_file(tmp_path, fake.url, fake.credentials.client_id, fake.credentials.org_id,
                            attributes=["personalEmail.address"])
    path.write_text(path.read_text().replace('hub = "exports"', 'hub = "exports-v2"'))
    changed = load_destination(path, {"ADOBE_CLIENT_SECRET": fake.credentials.client_secret,
                                      "ADOBE_EVENTHUBS_SAS_KEY": SAS_KEY})
    fake.clear_requests()
    fake.add_latency(LATE_S, method="PATCH", answer_only=True)  # both patches applied, answered late
    steps = await reconcile(changed)
    assert ("update", "target connection") in [(s.action, s.what) for s in steps]
    assert ("update", "attributes") in [(s.action, s.what) for s in steps]
    assert fake.entities("targetConnections", sandbox="dev")[0]["params"]["eventHubName"] == "exports-v2"
    flow = fake.entities("flows", sandbox="dev")[0]
    assert [s["value"]["path"] for s in flow["transformations"][0]["params"]["profileSelectors"]["selectors"]] == [
        "personalEmail.address"]
    assert len(fake.requests_to("PATCH")) == 2  # one each: the re-read showed it done

    # A 5xx: the patch is read again (a fresh etag and state) before it is sent again.
    fake.clear_faults()
    fake.clear_requests()
    fake.inject(503, times=1, method="PATCH", path=r"/flows/", retry_after=0)
    await reconcile(load(fake, tmp_path))  # back to the first attributes
    flow_calls = [(r.method, r.status) for r in fake.requests if "/flowservice/flows/" in r.path]
    first_patch = flow_calls.index(("PATCH", 503))
    assert flow_calls[first_patch + 1:first_patch + 3] == [("GET", 200), ("PATCH", 200)]


async def test_ims_throttling_and_server_errors_are_retried(fake: FakePlatform, tmp_path: Path) -> None:
    fake.inject(429, times=1, path=r"^/ims/", retry_after=0)
    fake.inject(503, times=1, path=r"^/ims/", retry_after=0)
    await reconcile(load(fake, tmp_path), apply=False)
    assert [r.status for r in fake.requests_to("POST", r"^/ims/")] == [429, 503, 200]


async def test_ims_that_keeps_failing_says_so_in_one_line(fake: FakePlatform, tmp_path: Path) -> None:
    fake.inject(503, times=10, path=r"^/ims/", retry_after=0)
    with pytest.raises(ProvisioningError) as failed:
        await reconcile(load(fake, tmp_path), apply=False)
    assert "token request failed: 503" in str(failed.value) and "\n" not in str(failed.value)
    assert len(fake.requests_to("POST", r"^/ims/")) == FAST_RETRY.attempts


# --- through the CLI ---------------------------------------------------------------------------
def provision(fake: FakePlatform, path: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["provision", *args, str(path)], env={
        "ADOBE_CLIENT_SECRET": fake.credentials.client_secret, "ADOBE_EVENTHUBS_SAS_KEY": SAS_KEY})
    return result.exit_code, result.output


def test_the_cli_adopts_what_timed_out_and_a_second_apply_writes_nothing(
        fake_in_thread: FakePlatform, tmp_path: Path) -> None:
    fake = fake_in_thread
    path = destination_file(tmp_path, fake.url, fake.credentials.client_id, fake.credentials.org_id)
    fake.add_latency(1.0, method="POST", path=CREATES, answer_only=True)
    fake.add_latency(1.0, method="PATCH", answer_only=True)
    code, output = provision(fake, path, "apply", "--timeout", "0.5")
    assert code == 0, output
    assert counts(fake) == EVERYTHING_ONCE
    assert len(fake.requests_to("POST", CREATES)) == 5

    fake.clear_faults()
    fake.clear_requests()
    code, output = provision(fake, path, "apply", "--json")
    assert code == 0, output
    assert writes(fake) == []

    # Every kind of patch (a base connection's auth, a target's params, a flow's selectors), each
    # carried out but answered too late: each is sent once, then read back and found done.
    text = path.read_text().replace('namespace = "acme-ns"', 'namespace = "acme-ns-2"')
    path.write_text(text.replace('hub = "exports"', 'hub = "exports-v2"').replace(
        '"personalEmail.address"]', '"personalEmail.address", "person.name.firstName"]'))
    fake.add_latency(1.0, method="PATCH", answer_only=True)
    code, output = provision(fake, path, "apply", "--timeout", "0.5")
    assert code == 0, output
    assert sorted(r.path.split("/")[4] for r in fake.requests_to("PATCH")) == [
        "connections", "flows", "targetConnections"]
    assert fake.entities("targetConnections", sandbox="dev")[0]["params"]["eventHubName"] == "exports-v2"
    base = next(c for c in fake.entities("connections", sandbox="dev") if c["name"].endswith("Azure Event Hubs"))
    assert base["auth"]["params"]["namespace"] == "acme-ns-2"
    fake.clear_faults()
    fake.clear_requests()
    assert provision(fake, path, "apply")[0] == 0 and writes(fake) == []


class _HtmlAnswers(http.server.BaseHTTPRequestHandler):
    """What a wrong ``ims_url`` or a proxy answers: an HTML page."""

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b"<html><body><h1>Welcome to nginx</h1></body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_an_html_answer_from_ims_is_one_line_that_names_ims_url(
        fake_in_thread: FakePlatform, tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HtmlAnswers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        wrong = f"http://127.0.0.1:{server.server_address[1]}"
        fake = fake_in_thread
        path = destination_file(tmp_path, fake.url, fake.credentials.client_id, fake.credentials.org_id)
        path.write_text(path.read_text().replace(f'ims_url = "{fake.url}"', f'ims_url = "{wrong}"'))
        code, output = provision(fake, path, "plan")
    finally:
        server.shutdown()
        thread.join(10)
    assert code == 1
    assert output.count("\n") == 1 and "Traceback" not in output
    assert "not JSON" in output and f"adobe.ims_url ({wrong})" in output and "text/html" in output
