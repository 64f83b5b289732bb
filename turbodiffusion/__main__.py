import sys

from turbodiffusion.cli import main

sys.exit(main())
