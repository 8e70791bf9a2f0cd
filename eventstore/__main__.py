"""``python -m eventstore``: the command line."""

from eventstore.cli import main

raise SystemExit(main())
