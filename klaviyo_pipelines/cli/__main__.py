"""`python -m klaviyo_pipelines.cli`, the console script without the installed entry point."""

import sys

from klaviyo_pipelines.cli import main

sys.exit(main())
