"""Run normlab's benchmark table (same options as `normlab bench`).

Example:
    python benchmarks/run_bench.py --threads 2 --format md
"""

import argparse
import sys

from normlab import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=bench.__doc__.splitlines()[0])
    bench.add_arguments(parser)
    sys.exit(bench.run(parser.parse_args()))
