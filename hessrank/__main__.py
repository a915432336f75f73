"""``python -m hessrank``: the ``hessrank`` command (as ``python -m hessrank.cli``)."""

import sys

from hessrank.cli import main

sys.exit(main())
