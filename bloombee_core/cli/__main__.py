import sys

from bloombee_core.cli import main

sys.exit(main())
