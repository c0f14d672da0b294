"""python -m edgeseq.cli"""

from edgeseq.cli import main

main()
