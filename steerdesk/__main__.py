"""``python -m steerdesk``: same as the ``steerdesk`` command."""

from .app import main

raise SystemExit(main())
