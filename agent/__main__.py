"""`python -m agent` is the `cva` command."""

from agent.cli import main

raise SystemExit(main())
