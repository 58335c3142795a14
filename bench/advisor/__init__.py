"""The layout advisor's parts: ``probe`` (this machine's peaks and link, the calibration on committed sweeps,
the time model checked against them) and ``layouts`` (every layout llmopt supports, predicted, ranked and
put in words). ``python -m bench.advise`` is the command line over them."""


class AdviseError(ValueError):
    """A request the advisor cannot answer: printed as one ``error:`` line, exit 2."""
