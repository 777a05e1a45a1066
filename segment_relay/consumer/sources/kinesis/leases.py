"""The DynamoDB lease table that lets several replicas share the shards of one stream (KCL-style).

One item per shard, with plain attribute names so that one
``aws dynamodb scan --table-name APP-leases`` shows who owns what:

=============================  ==========================================================
``leaseKey``                   the shard id (hash key)
``leaseOwner``                 worker id of the owner; absent (or NULL) when the lease is free
``leaseCounter``               bumped by every take, renewal and release: the heartbeat
``checkpoint``                 last fully processed sequence number, ``SHARD_END``, or absent
``parentShardIds``             list of the parent shard ids (empty for an original shard)
``lastRenewedAt``              ISO-8601 UTC time of the last take/renew, for humans only
``ownerSwitchesSinceCheckpoint``  how often the lease changed hands since the last checkpoint
``handoffTo``                  a worker that asked the owner to hand the lease over (absent: none)
=============================  ==========================================================

Liveness never compares clocks across machines: a lease is expired when *its counter* has not
moved for a lease duration, as seen by the observer's own monotonic clock (the coordinator does
that). Every write here is conditional; a failed condition means "someone else won" and comes
back as ``None``/``False``, never as an exception. Other errors (network, throttling) propagate.

Only plain conditional writes are used (no transactions, no TTL), so dynalite can stand in for
DynamoDB in tests.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

__all__ = ["Lease", "LeaseTable"]

# Attribute names (``leaseOwner`` is referenced through ``#owner``: a reserved-word-safe habit).
KEY = "leaseKey"
OWNER = "leaseOwner"
COUNTER = "leaseCounter"
CHECKPOINT = "checkpoint"
PARENTS = "parentShardIds"
RENEWED_AT = "lastRenewedAt"
SWITCHES = "ownerSwitchesSinceCheckpoint"
HANDOFF = "handoffTo"

_CONDITION_FAILED = "ConditionalCheckFailedException"

# The lease is free: the owner attribute is absent (our release REMOVEs it) or explicitly NULL.
_IS_FREE = "(attribute_not_exists(#owner) OR attribute_type(#owner, :null_type))"


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _is_condition_failure(error: ClientError) -> bool:
    return bool(error.response.get("Error", {}).get("Code") == _CONDITION_FAILED)


@dataclass
class Lease:
    """One row of the lease table (see the module docstring for the DynamoDB attribute names)."""

    shard_id: str
    owner: str | None = None
    counter: int = 0
    checkpoint: str | None = None  # a sequence number, SHARD_END, or None (never checkpointed)
    parent_shard_ids: list[str] = field(default_factory=list)
    last_renewed_at: str | None = None  # for humans only; never used to decide liveness
    owner_switches: int = 0
    handoff_to: str | None = None  # a worker that asked the owner for it

    @property
    def is_free(self) -> bool:
        return self.owner is None

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> Lease:
        def text(name: str) -> str | None:
            value = item.get(name)
            return None if value is None or "NULL" in value else str(value["S"])

        def number(name: str) -> int:
            value = item.get(name)
            return 0 if value is None or "NULL" in value else int(value["N"])

        parents = item.get(PARENTS)
        if parents is None or "NULL" in parents:
            parent_ids: list[str] = []
        elif "L" in parents:
            parent_ids = [str(entry["S"]) for entry in parents["L"]]
        else:  # a string set, if someone wrote one by hand
            parent_ids = sorted(str(entry) for entry in parents.get("SS", []))
        return cls(
            shard_id=str(item[KEY]["S"]),
            owner=text(OWNER),
            counter=number(COUNTER),
            checkpoint=text(CHECKPOINT),
            parent_shard_ids=parent_ids,
            last_renewed_at=text(RENEWED_AT),
            owner_switches=number(SWITCHES),
            handoff_to=text(HANDOFF),
        )

    def to_item(self) -> dict[str, Any]:
        """The DynamoDB item; None-valued optional attributes are left out."""
        item: dict[str, Any] = {
            KEY: {"S": self.shard_id},
            COUNTER: {"N": str(self.counter)},
            PARENTS: {"L": [{"S": parent} for parent in self.parent_shard_ids]},
            SWITCHES: {"N": str(self.owner_switches)},
        }
        if self.owner is not None:
            item[OWNER] = {"S": self.owner}
        if self.checkpoint is not None:
            item[CHECKPOINT] = {"S": self.checkpoint}
        if self.last_renewed_at is not None:
            item[RENEWED_AT] = {"S": self.last_renewed_at}
        if self.handoff_to is not None:
            item[HANDOFF] = {"S": self.handoff_to}
        return item


class LeaseTable:
    """Conditional reads and writes on the lease table. ``client`` is an aiobotocore DynamoDB
    client (already entered); this class never opens or closes it."""

    def __init__(self, client: Any, table_name: str) -> None:
        self.client = client
        self.table_name = table_name

    # -- table --------------------------------------------------------------------------------

    async def ensure_table(self, timeout_s: float = 300.0) -> None:
        """Create the table (on-demand billing) if it is missing and wait until it is ACTIVE.
        Several replicas may call this at once: losing the creation race is fine."""
        try:
            status = await self._table_status()
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
                raise
            try:
                await self.client.create_table(
                    TableName=self.table_name,
                    BillingMode="PAY_PER_REQUEST",
                    AttributeDefinitions=[{"AttributeName": KEY, "AttributeType": "S"}],
                    KeySchema=[{"AttributeName": KEY, "KeyType": "HASH"}],
                )
            except ClientError as create_error:
                if create_error.response.get("Error", {}).get("Code") != "ResourceInUseException":
                    raise
            status = ""
        deadline = time.monotonic() + timeout_s
        delay = 0.02
        while status != "ACTIVE":
            if time.monotonic() > deadline:
                raise TimeoutError(f"lease table {self.table_name} not ACTIVE after {timeout_s} s (status {status!r})")
            try:
                status = await self._table_status()
            except ClientError as error:  # created by a racer but not visible yet
                if error.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
                    raise
                status = ""
            if status != "ACTIVE":
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _table_status(self) -> str:
        response = await self.client.describe_table(TableName=self.table_name)
        return str(response["Table"]["TableStatus"])

    # -- reads --------------------------------------------------------------------------------

    async def list_leases(self) -> list[Lease]:
        """Every lease, read with a consistent scan (all pages)."""
        leases: list[Lease] = []
        kwargs: dict[str, Any] = {"TableName": self.table_name, "ConsistentRead": True}
        while True:
            response = await self.client.scan(**kwargs)
            leases.extend(Lease.from_item(item) for item in response.get("Items", []))
            last_key = response.get("LastEvaluatedKey")
            if not last_key:
                return leases
            kwargs["ExclusiveStartKey"] = last_key

    async def get(self, shard_id: str) -> Lease | None:
        response = await self.client.get_item(
            TableName=self.table_name, Key={KEY: {"S": shard_id}}, ConsistentRead=True
        )
        item = response.get("Item")
        return Lease.from_item(item) if item else None

    # -- writes (all conditional) -------------------------------------------------------------

    async def create_if_missing(self, shard_id: str, parent_shard_ids: list[str] | tuple[str, ...] = ()) -> bool:
        """Create a free lease with no checkpoint; False if the lease already exists."""
        lease = Lease(shard_id=shard_id, parent_shard_ids=list(parent_shard_ids))
        try:
            await self.client.put_item(
                TableName=self.table_name,
                Item=lease.to_item(),
                ConditionExpression="attribute_not_exists(#key)",
                ExpressionAttributeNames={"#key": KEY},
            )
        except ClientError as error:
            if _is_condition_failure(error):
                return False
            raise
        return True

    async def take(self, lease: Lease, owner: str) -> Lease | None:
        """Take ``lease`` as ``owner``, provided its counter and owner are still what ``lease``
        says (works for free, expired and stolen leases alike). Returns the new lease, or None
        when someone else changed it first."""
        switch = 0 if lease.owner == owner else 1
        names = {"#owner": OWNER}
        values: dict[str, Any] = {
            ":expected": {"N": str(lease.counter)},
            ":next": {"N": str(lease.counter + 1)},
            ":me": {"S": owner},
            ":now": {"S": _now_iso()},
            ":zero": {"N": "0"},
            ":switch": {"N": str(switch)},
        }
        if lease.owner is None:
            owner_condition = _IS_FREE
            values[":null_type"] = {"S": "NULL"}
        else:
            owner_condition = "#owner = :seen"
            values[":seen"] = {"S": lease.owner}
        return await self._update(
            lease.shard_id,
            update=(
                f"SET #owner = :me, {COUNTER} = :next, {RENEWED_AT} = :now, "
                f"{SWITCHES} = if_not_exists({SWITCHES}, :zero) + :switch REMOVE {HANDOFF}"
            ),
            condition=f"{COUNTER} = :expected AND {owner_condition}",
            names=names,
            values=values,
        )

    async def renew(self, lease: Lease) -> Lease | None:
        """Bump the counter of a lease we own. None means it is lost (taken by someone else)."""
        return await self._bump_owned(lease, release=False)

    async def checkpoint(self, lease_or_shard_id: Lease | str, owner: str, sequence: str) -> bool:
        """Record ``sequence`` (or SHARD_END) as the checkpoint if ``owner`` still owns the lease.
        Does not touch the counter, so it never races with renewals; resets ownerSwitches."""
        shard_id = lease_or_shard_id.shard_id if isinstance(lease_or_shard_id, Lease) else lease_or_shard_id
        result = await self._update(
            shard_id,
            update=f"SET #checkpoint = :sequence, {SWITCHES} = :zero",
            condition="#owner = :me",
            names={"#owner": OWNER, "#checkpoint": CHECKPOINT},
            values={":sequence": {"S": sequence}, ":zero": {"N": "0"}, ":me": {"S": owner}},
        )
        return result is not None

    async def request_handoff(self, lease: Lease, to: str) -> bool:
        """Ask the owner of ``lease`` to hand it over to ``to`` (KCL 3's graceful hand-off): the
        owner finishes and checkpoints what it read, then releases it. The counter is left alone,
        so the owner's renewals go on; False if the owner changed or someone asked first."""
        assert lease.owner is not None
        result = await self._update(
            lease.shard_id,
            update=f"SET {HANDOFF} = :to",
            condition=f"#owner = :owner AND attribute_not_exists({HANDOFF})",
            names={"#owner": OWNER},
            values={":to": {"S": to}, ":owner": {"S": lease.owner}},
        )
        return result is not None

    async def release(self, lease: Lease, *, keep_handoff: bool = False) -> bool:
        """Make a lease we own free (owner removed) and bump its counter, so others see it free
        at once and a stale holder of the old counter can no longer renew it. ``keep_handoff``:
        a hand-over, the asker's name stays (the lease is reserved for it; taking clears it)."""
        return await self._bump_owned(lease, release=True, keep_handoff=keep_handoff) is not None

    async def _bump_owned(self, lease: Lease, *, release: bool, keep_handoff: bool = False) -> Lease | None:
        """Renew or release: bump the counter of a lease we still own at the counter we saw."""
        if lease.owner is None:
            return None
        removed = "" if not release else "REMOVE #owner " if keep_handoff else f"REMOVE #owner, {HANDOFF} "
        return await self._update(
            lease.shard_id,
            update=removed + f"SET {COUNTER} = :next, {RENEWED_AT} = :now",
            condition=f"#owner = :me AND {COUNTER} = :expected",
            names={"#owner": OWNER},
            values={
                ":me": {"S": lease.owner},
                ":expected": {"N": str(lease.counter)},
                ":next": {"N": str(lease.counter + 1)},
                ":now": {"S": _now_iso()},
            },
        )

    async def delete(self, shard_id: str) -> None:
        """Remove a lease (tests, clean-up of long-gone shards)."""
        await self.client.delete_item(TableName=self.table_name, Key={KEY: {"S": shard_id}})

    async def _update(
        self, shard_id: str, *, update: str, condition: str, names: dict[str, str], values: dict[str, Any]
    ) -> Lease | None:
        try:
            response = await self.client.update_item(
                TableName=self.table_name,
                Key={KEY: {"S": shard_id}},
                UpdateExpression=update,
                ConditionExpression=condition,
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
                ReturnValues="ALL_NEW",
            )
        except ClientError as error:
            if _is_condition_failure(error):
                return None
            raise
        return Lease.from_item(response["Attributes"])
