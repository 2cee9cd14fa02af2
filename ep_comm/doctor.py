"""``python -m ep_comm.doctor``: the command's stable entry point; the checks live in
``ep_comm.tools.doctor``."""
from ep_comm.tools.doctor.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
