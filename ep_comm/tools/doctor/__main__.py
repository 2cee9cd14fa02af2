"""``python -m ep_comm.tools.doctor``; the round trip's rank processes start this way too."""
import sys

from ep_comm.tools.doctor.cli import main

sys.exit(main())
