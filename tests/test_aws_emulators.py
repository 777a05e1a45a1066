"""The emulators the Kinesis tests stand on: started on loopback, answering, stopped by PID."""

from __future__ import annotations

import os
import subprocess
import uuid

from aiobotocore.session import get_session

from segment_relay.testing.aws import EMULATORS, Emulator, node_executable, running, start_dynalite
from segment_relay.testing.kinesis import create_stream


async def test_kinesalite_creates_a_stream_and_takes_records(kinesalite: Emulator) -> None:
    name = f"probe-{uuid.uuid4().hex[:8]}"
    async with get_session().create_client("kinesis", endpoint_url=kinesalite.endpoint) as client:
        await create_stream(client, name, 2)  # waits for ACTIVE: CREATING can last a moment
        await client.put_record(StreamName=name, Data=b"{}", PartitionKey="p")
        shards = (await client.list_shards(StreamName=name))["Shards"]
        assert len(shards) == 2
        await client.delete_stream(StreamName=name)


async def test_dynalite_conditional_write(dynalite: Emulator) -> None:
    async with get_session().create_client("dynamodb", endpoint_url=dynalite.endpoint) as client:
        await client.create_table(
            TableName="probe", BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[{"AttributeName": "k", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "k", "KeyType": "HASH"}],
        )
        await client.put_item(TableName="probe", Item={"k": {"S": "a"}}, ConditionExpression="attribute_not_exists(k)")
        try:
            await client.put_item(TableName="probe", Item={"k": {"S": "a"}}, ConditionExpression="attribute_not_exists(k)")
        except client.exceptions.ConditionalCheckFailedException:
            pass
        else:
            raise AssertionError("the second conditional put should have failed")
        await client.delete_table(TableName="probe")


def test_an_emulator_is_stopped_by_pid(aws_env: None) -> None:
    with running(start_dynalite()) as emulator:
        pid = emulator.pid
        os.kill(pid, 0)  # alive
    assert emulator.process.poll() is not None


def test_the_faster_sequence_parser_answers_as_kinesalites_own() -> None:
    """kinesalite-local.js swaps kinesalite's parseSequence for a BigInt one (the emulator's largest
    cost per record); over generated and perturbed sequence numbers of every version, and odd
    inputs, both give the same result or the same error."""
    done = subprocess.run([node_executable(), "check-fast-sequence.js", "20000"], cwd=EMULATORS, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "mismatches 0" in done.stdout
