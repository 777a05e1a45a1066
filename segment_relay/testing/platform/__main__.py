"""Run the fake Adobe platform: ``python -m segment_relay.testing.platform --port 8089``.

Prints one JSON line (url, token/Flow Service/Segmentation URLs, client id, org id, audience ids;
never the client secret) once it listens on 127.0.0.1, then serves until SIGINT/SIGTERM.
The client secret is ``--client-secret``, else ``$SEGMENT_RELAY_FAKE_CLIENT_SECRET``, else the
documented default ``fake-client-secret``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import orjson

from ..processes import until_signalled
from .catalog import DEFAULT_AUDIENCES, Audience
from .server import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_ORG_ID, FakePlatform
from .simulator import ExportSettings


def _audience(value: str) -> Audience:
    audience_id, sep, name = value.partition("=")
    if not sep or not audience_id or not name:
        raise argparse.ArgumentTypeError(f"expected ID=NAME, got {value!r}")
    return Audience(id=audience_id, name=name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m segment_relay.testing.platform", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 picks a free one)")
    parser.add_argument("--client-id", default=DEFAULT_CLIENT_ID)
    parser.add_argument("--client-secret", default=None, help="default: $SEGMENT_RELAY_FAKE_CLIENT_SECRET or the built-in")
    parser.add_argument("--org-id", default=DEFAULT_ORG_ID)
    parser.add_argument("--token-ttl", type=int, default=86399, help="expires_in of issued tokens, seconds")
    parser.add_argument("--audience", type=_audience, action="append", help="ID=NAME, repeatable (default: 7 seeded)")
    parser.add_argument("--sandbox", action="append", help="allowed sandbox names, repeatable (default: any)")
    parser.add_argument("--no-exports", action="store_true", help="do not simulate exports for enabled flows")
    parser.add_argument("--export-records", type=int, default=1000, help="records per simulation phase")
    parser.add_argument("--export-rate", type=float, default=None, help="records/s (default: as fast as possible)")
    parser.add_argument("--export-profiles", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--kinesis-endpoint", default=None, help="local Kinesis endpoint (kinesalite) for exports")
    parser.add_argument("--patch-status", type=int, choices=(200, 202), default=200)
    parser.add_argument("--delete-status", type=int, choices=(202, 204), default=202)
    parser.add_argument("--eventhubs-sas-auth", action="store_true",
                        help="offer Event Hubs' hub-scoped SAS auth spec (its name is the fake's guess)")
    parser.add_argument("--throttle-rate", type=float, default=0.0, help="share of platform calls answered 429")
    parser.add_argument("--flow-deletion-s", type=float, default=0.2,
                        help="with --delete-status 202: how long a deleted dataflow stays marked for deletion")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    exports = None if args.no_exports else ExportSettings(
        records=args.export_records, rate=args.export_rate, profiles=args.export_profiles, seed=args.seed)
    fake = FakePlatform(
        client_id=args.client_id,
        client_secret=args.client_secret or os.environ.get("SEGMENT_RELAY_FAKE_CLIENT_SECRET") or DEFAULT_CLIENT_SECRET,
        org_id=args.org_id, token_ttl_s=args.token_ttl, audiences=args.audience or DEFAULT_AUDIENCES,
        sandboxes=args.sandbox, exports=exports, kinesis_endpoint=args.kinesis_endpoint,
        patch_status=args.patch_status, delete_status=args.delete_status,
        flow_deletion_s=args.flow_deletion_s, eventhubs_sas_auth=args.eventhubs_sas_auth,
        throttle_rate=args.throttle_rate, seed=args.seed, port=args.port,
    )
    await fake.start()
    ready = {
        "url": fake.url, "ims_token_url": fake.ims_token_url, "flow_service_url": fake.flow_service_url,
        "segmentation_url": fake.segmentation_url, "client_id": fake.ims.client_id, "org_id": fake.org_id,
        "audiences": sorted(fake.segmentation.global_audiences), "pid": os.getpid(),
    }
    sys.stdout.write(orjson.dumps(ready).decode() + "\n")
    sys.stdout.flush()
    try:
        await until_signalled()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> None:
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
