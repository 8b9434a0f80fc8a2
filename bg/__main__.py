import sys

from bg.cli import main

sys.exit(main())
