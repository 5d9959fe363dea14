import sys

from stage2_classify.cli import main

sys.exit(main())
