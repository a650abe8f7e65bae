import sys

from graphduo.cli import main

sys.exit(main())
