"""``python -m broker``: the same as the ``broker`` command."""

from broker.operations.cli import main

raise SystemExit(main())
