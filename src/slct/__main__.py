import sys

from slct.cli import main

sys.exit(main())
