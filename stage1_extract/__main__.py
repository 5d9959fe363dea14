import sys

from stage1_extract.cli import main

sys.exit(main())
