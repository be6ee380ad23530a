"""A local stand-in for the apixo hailuo-2-3-fast API (see /work/shared/apixo-contract.md).

`run_emulator(config)` serves it from a background thread (tests, benchmarks); `serve(config)`
serves it in the foreground (`hailuo-batch emulator`). Prompt markers (`[fail:CODE]`,
`[flaky:CODE]`, `[reject:NNN]`) and fault injection make every failure path reachable.
"""

from hailuo_batch.emulator.config import EmulatorConfig
from hailuo_batch.emulator.contract import input_key
from hailuo_batch.emulator.faults import FAULT_KINDS, SCRIPT_ROUTES
from hailuo_batch.emulator.server import EmulatorHandle, run_emulator, serve

__all__ = [
    "FAULT_KINDS",
    "SCRIPT_ROUTES",
    "EmulatorConfig",
    "EmulatorHandle",
    "input_key",
    "run_emulator",
    "serve",
]
