"""Worker entry point: `python -m qatkit.bench _memory|_decode '<json args>'` (internal)."""

import json
import sys

from qatkit.bench.common import RESULT_PREFIX
from qatkit.bench.decode import decode_worker
from qatkit.bench.executorch import pte_decode_worker
from qatkit.bench.training import memory_worker


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("_memory", "_decode"):
        print("usage: python -m qatkit.bench _memory|_decode '<json args>'  (internal; use `qatkit bench perf`)")
        return 2
    args = json.loads(argv[1])
    if argv[0] == "_memory":
        print(RESULT_PREFIX + json.dumps(memory_worker(args)), flush=True)
    elif args["model_dir"].endswith(".pte"):
        pte_decode_worker(args)
    else:
        decode_worker(args)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
