import sys

from mardini.reproduce.main import cli

sys.exit(cli())
