"""FRANK end to end at toy scale (issue 8).

    python benchmarks/frank_toy.py --out runs/frank_toy --results benchmarks/results   # the experiment
    python benchmarks/frank_toy.py --fast --out /tmp/frank_fast                         # plumbing, ~30 s

See benchmarks/frank/study.py for the stages and their caching.
"""

from __future__ import annotations

import sys

from frank.study import main  # benchmarks/frank/: this script's folder is first on sys.path

if __name__ == "__main__":
    sys.exit(main())
