"""The cells of a table, one unit per cell kind, each measuring or reading its own cells:

static.py      params and MACs (fvcore, cached)
throughput.py  images/s and the gains between them (interleaved timing, cached per group)
accuracy.py    top-1 from a run's result.json that reproduce/provenance.py accepts
settings.py    hyper-parameters and architecture read from a recipe or the built model
notes.py       every note text a cell carries, in one place

reproduce/runner.py's TableRun decides which cells a run needs and puts each through its unit.
"""
