"""`python -m jfig`: the jfig command line."""
import sys

from .cli import main

sys.exit(main())
