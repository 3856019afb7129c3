import sys

from mardini.reproduce.main import main

sys.exit(main())
