import sys

from stroke_tss.cli import main

sys.exit(main())
