"""Serve the apixo emulator in the foreground with any `EmulatorConfig` (the benchmark's provider).

    .venv/bin/python bench/run_emulator.py '{"port": 0, "processing_distribution": "lognormal"}'

`hailuo-batch emulator` exposes only some of the knobs; the benchmark needs the lognormal
generation times and the record of timings too. Logs "serving at URL" like the CLI; SIGTERM
stops it (and writes `timings_file` when set).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hailuo_batch.emulator import EmulatorConfig, serve  # noqa: E402

if __name__ == "__main__":
    serve(EmulatorConfig(**json.loads(sys.argv[1])))
