"""The ``fastv-analyze`` command line (installed as ``fastv_analysis.cli``)."""
