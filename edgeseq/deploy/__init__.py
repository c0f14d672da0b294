"""Deployment: the pipeline and everything around a bundle.

    bundle       the bundle format: manifest, graphs, sha256s (torch-free reader)
    progress     what long work reports to (stages, graph calls); the CLI draws it
    runtimes     which runtime runs which flavor; a target's providers and threads
    validation   the reference, the inputs and the verdict per flavor; ``edgeseq validate``
    run          streaming text from a bundle (``edgeseq run``, torch-free)
    bench        decode latency, prefill throughput, peak RSS (``edgeseq bench``)
    engine       TensorRT engines built on the device (``edgeseq build-engine``)
    pipeline     load -> plan -> extract -> export -> quantize -> validate -> bundle

Imports run one way, top to bottom of that list (``pipeline`` above ``validation``).
"""
