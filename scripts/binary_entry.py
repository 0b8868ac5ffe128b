"""PyInstaller entry script for the steerdesk binary (see build.spec).

``steerdesk/__main__.py`` cannot be the entry: PyInstaller runs the script as a top-level
``__main__`` module, where its relative import would fail.
"""

import multiprocessing

from steerdesk.app import main

if __name__ == "__main__":
    multiprocessing.freeze_support()
    raise SystemExit(main())
