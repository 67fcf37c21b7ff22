"""``python -m stabq`` (and ``torchrun -m stabq``) runs the command line."""

from stabq.cli import main

main()
