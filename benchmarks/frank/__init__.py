"""The FRANK toy study (issue 8), run by ``python benchmarks/frank_toy.py``: an experiment, not part of
the package.

Modules, each importing only those listed before it: :mod:`.config` (settings, part configs),
:mod:`.parts` (what is trained and measured), :mod:`.report` (evaluation, analysis, the report),
:mod:`.study` (the cached stages and the command line).
"""
