"""``python -m stage2_classify``: the same commands as the ``stage2-classify`` console script."""

import sys

from stage2_classify.cli import main

sys.exit(main())
