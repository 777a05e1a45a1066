"""Run the Event Hubs emulator: ``python -m segment_relay.testing.eventhubs --port P --hub NAME:PARTITIONS``."""

from __future__ import annotations

import argparse
import asyncio

from segment_relay.testing.eventhubs.server import EventHubsEmulator
from segment_relay.testing.processes import until_signalled


def _hub(value: str) -> tuple[str, int]:
    name, sep, count = value.rpartition(":")
    if not sep or not name or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME:PARTITIONS, got {value!r}")
    return name, int(count)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m segment_relay.testing.eventhubs", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5672, help="TCP port (0 picks a free one)")
    parser.add_argument("--hub", type=_hub, action="append", required=True, help="NAME:PARTITIONS, repeatable")
    parser.add_argument("--retention", type=int, default=None, help="max events kept per partition")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    emulator = EventHubsEmulator(dict(args.hub), host=args.host, port=args.port, retention=args.retention)
    await emulator.start()
    for name in dict(args.hub):
        print(emulator.connection_string(name), flush=True)
    try:
        await until_signalled()
    finally:
        await emulator.stop()


def main(argv: list[str] | None = None) -> None:
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
