"""`python -m demo --ckpt runs/default [--host 127.0.0.1] [--port 7860]`: serve the demo.

Binds to localhost unless a host is given; never creates a public share link.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    p.add_argument("--ckpt", default="runs/default", help="a run folder or one of its checkpoint folders")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to your network)")
    p.add_argument("--port", type=int, default=7860)
    args = p.parse_args(argv)

    # checked before importing torch and gradio, so the common mistake is answered at once
    if not Path(args.ckpt).exists():
        print(f"no checkpoint at {args.ckpt}: run `make tokenize train` first (or pass --ckpt a run folder)",
              file=sys.stderr)
        return 2
    from sample.api import MultimodalModel

    try:
        mm = MultimodalModel.from_pretrained(args.ckpt)
    except ValueError as e:
        print(f"cannot load {args.ckpt}: {e}\nrun `make tokenize train` first (or pass --ckpt a run folder)",
              file=sys.stderr)
        return 2
    from demo.app import build_demo, serve

    print(f"serving {args.ckpt} on http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    serve(build_demo(mm), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
