"""llmopt's torch-free core: the configuration and its checks (``config``), a model's shapes and their
arithmetic (``shapes``), a run's metrics record (``run_metrics``) and the command-line convention with every
exit code (``cli``). What only reads a config (the harness's parent process, a flag's check, a job's wrapper)
imports these and never torch; tests/test_structure.py keeps it so."""
