"""The ``tipr`` command line (LightningCLI arrives with the CLI issue)."""

import sys


def main(argv=None) -> int:
    print("usage: tipr {fit,validate,test,predict} ... (LightningCLI: not wired yet)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
