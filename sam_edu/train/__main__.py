"""``python -m sam_edu.train``: see :mod:`sam_edu.train.cli`."""

from sam_edu.train.cli import main

raise SystemExit(main())
