"""``python -m bench.report``: the report of a sweep directory (``bench.report.main``)."""
from bench.report import main
from llmopt.core import cli

cli.exit(main())
