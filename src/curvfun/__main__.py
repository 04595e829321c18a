"""``python -m curvfun`` and the ``curvfun`` console script (see :mod:`curvfun.cli`)."""

import sys


def main(argv=None) -> int:
    from curvfun.cli.main import main as _main
    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
