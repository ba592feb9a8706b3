import sys

from green_mlops.cli import main

sys.exit(main())
