"""``python -m portaserve.launch_server [flags]``: the same as ``portaserve serve``."""
import sys

from portaserve.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
