"""python -m edgeseq.cli"""

from edgeseq.cli import run

run()
