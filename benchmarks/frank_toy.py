"""FRANK end to end at toy scale (issue 8); same as ``mllm bench frank-toy``.

    python benchmarks/frank_toy.py --out runs/frank_toy --results benchmarks/results   # full (~1 h, 2 cores)
    python benchmarks/frank_toy.py --fast --out /tmp/frank_fast                         # plumbing, ~1 min

See mllm/bench/frank_toy.py for the stages and their caching.
"""

from __future__ import annotations

import sys

from mllm.bench.frank_toy import main

if __name__ == "__main__":
    sys.exit(main())
