"""`edgecut bench sweep`: every cut × codec × emulated link through the real pipeline.

`records` holds the rows and writes CSV/JSON, `run` measures (edge agent → link emulator → tail
service), `report` turns measurements into the figures issue 7 asks for (regret, baselines,
overhead, prediction error) and `plots` draws them. The sweep is the benchmark layer: it may
import edge and cloud code, which never import each other.
"""
