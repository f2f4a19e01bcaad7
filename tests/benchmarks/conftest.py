"""benchmarks/ holds scripts and the packages they run (benchmarks/frank/); put the folder first on
``sys.path``, as ``python benchmarks/SCRIPT.py`` does, so tests import those packages the same way."""

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
