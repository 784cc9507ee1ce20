"""`python -m loraserve ...` is the same as the `loraserve` console script."""

from loraserve.cli import main

raise SystemExit(main())
