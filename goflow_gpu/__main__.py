"""``python -m goflow_gpu`` = the ``goflow-gpu`` command."""

from goflow_gpu.cli import main

main()
