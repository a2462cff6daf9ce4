"""python -m tiny [--root tiny_world] [--seed 0]: build (or re-use) the offline tiny world and print its paths."""

import argparse
import os
import sys
import time


def command_line():
    """The flags (answered before torch loads)."""
    parser = argparse.ArgumentParser(prog="python -m tiny", description="build (or re-use) the offline tiny world and "
                                                                        "print its paths")
    parser.add_argument("--root", default="tiny_world", help="the folder of the world")
    parser.add_argument("--seed", type=int, default=0, help="the seed of everything in it")
    return parser


def main(argv=None):
    args = command_line().parse_args(argv)  # --help and a mistyped flag answer here, before torch loads
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the library, one folder up
    import tiny
    import utils

    def build(_):
        t0 = time.time()
        for name, path in tiny.build_tiny_world(args.root, args.seed).items():
            print(f"{name:15s} {path}")
        print(f"tiny world ready in {time.time() - t0:.1f}s")
    return utils.cli(build, [])  # a mistake (a folder that is not a tiny world) is one error: line


if __name__ == "__main__":
    sys.exit(main())
