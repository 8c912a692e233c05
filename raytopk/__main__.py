import sys

from raytopk.cli import main

sys.exit(main())
