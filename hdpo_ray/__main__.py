import sys

from hdpo_ray.cli import main

sys.exit(main())
