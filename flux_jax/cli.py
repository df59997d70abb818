"""`flux-jax` command line: a thin dispatcher over the `flux_jax.commands.<name>` modules listed in `COMMANDS`.

Each command module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`, and imports what its
`run` needs inside `run`, so building the parser stays cheap. Errors caused by
user input (`FluxJaxError`) print one clear line and exit non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from flux_jax.commands import cache, convert, demo, export, extract_lora, plan, sample, train
from flux_jax.errors import FluxJaxError

COMMANDS = (cache, convert, demo, export, extract_lora, plan, sample, train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux-jax", description="Flux.1 LoRA training on JAX (Dev2Pro recipe).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        name = module.__name__.rsplit(".", 1)[-1]
        p = sub.add_parser(name.replace("_", "-"), help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        # orbax and TFDS log every file operation through absl at INFO; keep the console to our own progress.
        for name in ("absl", "orbax", "jax._src", "tensorflow"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return int(args._run(args) or 0)
    except FluxJaxError as e:
        print(f"flux-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flux-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
