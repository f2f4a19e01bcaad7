"""FRANK end to end at toy scale (issue 8); same as ``mllm bench frank-toy``.

    python benchmarks/frank_toy.py --out runs/frank_toy --results benchmarks/results   # the experiment
    python benchmarks/frank_toy.py --fast --out /tmp/frank_fast                         # plumbing, ~30 s

See mllm/bench/frank_toy.py for the stages and their caching.
"""

from __future__ import annotations

import sys

from mllm.bench.frank_toy import main

if __name__ == "__main__":
    sys.exit(main())
