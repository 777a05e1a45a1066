"""A local fake of Adobe's side for the provisioning client, the demo and tests: IMS OAuth,
Flow Service (connection specs, base/source/target connections, dataflows, runs) and Segmentation
(segment definitions, audiences), plus an export simulator that writes Adobe-shaped profile exports
into the local Event Hubs emulator or kinesalite once a dataflow is enabled and mapped.

::

    from segment_relay.testing.platform import ExportSettings, FakePlatform

    async with FakePlatform(exports=ExportSettings(records=500)) as fake:
        ...  # point the client at fake.url with fake.credentials
        simulation = await fake.simulation(flow_id)
        truth = await simulation.wait()     # the enter/exit changes the consumer must produce

Run as a process: ``python -m segment_relay.testing.platform --port 8089``.
"""

from .catalog import (
    DEFAULT_AUDIENCES,
    DEFAULT_SCOPES,
    DESTINATION_FLOW_SPEC_ID,
    EVENT_HUBS_AUTH_SPEC,
    EVENT_HUBS_SAS_AUTH_SPEC,
    EVENT_HUBS_SPEC_ID,
    KINESIS_AUTH_SPEC,
    KINESIS_SPEC_ID,
    PROFILE_SOURCE_SPEC_ID,
    Audience,
)
from .control import PERMISSIONS, Fault, Latency, RecordedRequest
from .server import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_ORG_ID, Credentials, FakePlatform
from .simulator import ExportSettings, Simulation, SimulationFailed
from .state import MASK

__all__ = [
    "FakePlatform",
    "Credentials",
    "ExportSettings",
    "Simulation",
    "SimulationFailed",
    "Audience",
    "Fault",
    "Latency",
    "RecordedRequest",
    "PERMISSIONS",
    "MASK",
    "DEFAULT_AUDIENCES",
    "DEFAULT_SCOPES",
    "DEFAULT_CLIENT_ID",
    "DEFAULT_CLIENT_SECRET",
    "DEFAULT_ORG_ID",
    "PROFILE_SOURCE_SPEC_ID",
    "KINESIS_SPEC_ID",
    "EVENT_HUBS_SPEC_ID",
    "DESTINATION_FLOW_SPEC_ID",
    "KINESIS_AUTH_SPEC",
    "EVENT_HUBS_AUTH_SPEC",
    "EVENT_HUBS_SAS_AUTH_SPEC",
]
