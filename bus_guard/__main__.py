import sys

from bus_guard.cli._main import main

sys.exit(main())
