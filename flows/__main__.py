"""``python -m flows`` runs the ``flows`` command."""

from flows.cli import main

raise SystemExit(main())
