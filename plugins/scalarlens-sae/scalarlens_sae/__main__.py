"""``python -m scalarlens_sae list DIR`` (the same as the ``scalarlens-sae`` command)."""

from ._release import main

raise SystemExit(main())
