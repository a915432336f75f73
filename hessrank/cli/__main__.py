"""``python -m hessrank.cli``."""

import sys

from hessrank.cli import main

sys.exit(main())
