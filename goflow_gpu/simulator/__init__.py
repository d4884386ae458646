"""The embedded GoFlow simulator: a strict in-process backend for tests, demos and benchmarks.

``Simulator`` serves the agent API of ``goflow-api.md`` on aiohttp (key check, UUID and body
validation, duplicate-400, 404s), a queue of generated jobs, real JPEGs for their media, seeded
fault injection (random per-call faults, outage windows, fixed answers, backend quirks), and a
``Ledger`` of everything it accepted. ``SimulatorThread`` runs one for
sync code. ``cli.register`` adds the ``simulate`` command.
"""

from goflow_gpu.simulator.app import Simulator
from goflow_gpu.simulator.catalog import ANALYSIS_TYPES
from goflow_gpu.simulator.faults import Faults, FaultSpec, parse_faults
from goflow_gpu.simulator.jobs import MEDIA_FAULTS
from goflow_gpu.simulator.ledger import Ledger
from goflow_gpu.simulator.scripted import FixedAnswer, Outage, parse_answer, parse_outage
from goflow_gpu.simulator.thread import SimulatorThread

__all__ = [
    "ANALYSIS_TYPES",
    "MEDIA_FAULTS",
    "FaultSpec",
    "Faults",
    "FixedAnswer",
    "Ledger",
    "Outage",
    "Simulator",
    "SimulatorThread",
    "parse_answer",
    "parse_faults",
    "parse_outage",
]
