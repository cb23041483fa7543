"""Batch correction: sphering (whitening) on negative controls, and the batch-experiment job (``job: profile``)."""

#: Sphering methods (:class:`msnoop.correct.sphering.Spherize`); here so that the CLI lists them without numpy.
METHODS: tuple[str, ...] = ("ZCA", "ZCA-cor", "PCA", "PCA-cor")
