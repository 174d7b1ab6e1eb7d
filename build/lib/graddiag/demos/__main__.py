"""``python -m graddiag.demos``: the ``make demo`` run."""

from graddiag.demos.run import main

raise SystemExit(main())
