"""`python -m caitsearch` (and `torchrun -m caitsearch`): the command line."""
from .cli import main

main()
