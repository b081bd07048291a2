import sys

from fedberry.cli import main

sys.exit(main())
