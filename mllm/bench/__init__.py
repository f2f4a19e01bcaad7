"""Experiments that run whole pipelines (``mllm bench NAME``): frank_toy (issue 8)."""
