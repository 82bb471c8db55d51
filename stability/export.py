"""Export a run: ``python -m stability.export hf RUN_DIR [--step N] OUT`` (also
``stability-export``).

``hf`` writes the run's newest checkpoint (or step N) as a Hugging Face model folder that
``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` and ``AutoTokenizer`` load: Llama2
recipe -> ``LlamaForCausalLM``, GPT recipe -> ``GPT2LMHeadModel`` (see ``stability/hf/`` and
docs/hf.md). Any tensor/pipeline layout; read offline on the CPU.

Exit status: 0 on success (one line saying what was written); 2 for bad input (no such
checkpoint, OUT not empty, a knob no transformers class expresses), one line naming it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROG = "stability-export"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Export a run's checkpoint.")
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    hf = formats.add_parser("hf", help="a Hugging Face transformers model folder",
                            description="Write a run's checkpoint as a folder that "
                            "transformers' AutoModelForCausalLM and AutoTokenizer load.")
    hf.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run directory")
    hf.add_argument("out", type=Path, metavar="OUT", help="the folder to write (new or empty)")
    hf.add_argument("--step", type=int, default=None, metavar="N",
                    help="the checkpoint of step N (default: the newest intact one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; 0, or 2 for bad input (after one line on stderr)."""
    args = build_parser().parse_args(argv)
    import stability  # noqa: F401  (quiets megatron-core's import warnings)
    from stability.errors import ConfigError, RunError
    from stability.hf.convert import Unsupported
    from stability.hf.export import export_hf
    from stability.hf.tokenizer import TokenizerConversionError

    try:
        info = export_hf(args.run_dir, args.out, args.step)
    except (RunError, ConfigError, Unsupported, TokenizerConversionError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {info['path']}: {info['class']} from step {info['step']}, "
          f"{info['parameters']:,} parameters ({info['dtype']}), vocab {info['vocab_size']}, "
          f"tokenizer {info['tokenizer']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
