"""`python -m attnc`: the same as the `attnc` command."""
from .cli import main

raise SystemExit(main())
