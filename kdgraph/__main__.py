"""``python -m kdgraph`` (and ``torchrun -m kdgraph train ...``) runs the CLI."""
from .cli import main

if __name__ == "__main__":
    main()
