import sys

from weightsmith.cli import main

sys.exit(main())
