"""`python -m fastcache ...`: the `fastcache` command, whose body is :mod:`fastcache.app.cli`."""

from fastcache.app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
