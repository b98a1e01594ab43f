"""distill: train a smaller student from a teacher checkpoint (one process, or many under accelerate launch)."""

from __future__ import annotations

from weightsmith.cli.common import add_command, add_output_options


def _ints(text: str) -> list[int]:
    import argparse

    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers such as 0,2,4") from None


def register(sub) -> None:
    p = add_command(
        sub,
        "distill",
        help="distil a teacher into a smaller student (KD on accelerate)",
        description="Train a student to imitate a teacher on a text corpus. Causal/masked LMs: "
        "alpha*T^2*KL(teacher||student) + (1-alpha)*CE; encoders: MSE + cosine on hidden states. "
        "Run under 'accelerate launch' to train data-parallel on several GPUs, CPUs or nodes. "
        "Each training option is a field of weightsmith.compress.distill.DistillConfig.",
        examples=[
            "weightsmith distill --teacher ./minilm -o ./minilm-3l --data corpus.txt --layers 0,2,4 --steps 50",
            "weightsmith distill --teacher ./llama -o ./llama-half --data train.jsonl --keep-every 2 "
            "--eval-data val.jsonl --eval-every 4 --save-every 4",
            "weightsmith distill --teacher ./llama -o ./llama-half --data train.jsonl --keep-every 2 "
            "--eval-data val.jsonl --eval-every 4 --save-every 4 --resume",
            "weightsmith distill --teacher ./llama -o ./small --data train.txt --student ./llama-pruned "
            "--alpha 0.7 --temperature 2",
            "accelerate launch --num_processes 4 -m weightsmith.cli distill --teacher ./llama -o ./small "
            "--data train.txt --keep-every 2 --steps 1000",
        ],
    )
    p.add_argument("--teacher", required=True, help="teacher model directory (transformers, with its tokenizer)")
    p.add_argument(
        "--data",
        required=True,
        help="training data: .txt (one document per line) or .jsonl ('text', for seq2seq optional 'target'); an "
        "image classifier's class_name/*.png folder; a speech model's folder of .wav files (or a .jsonl naming them "
        "in 'audio', optional 'target')",
    )
    add_output_options(p, inputs=("teacher", "student"), shards=False)
    add_config_flags(p)
    p.add_argument("--state-dir", help="where training states go (default OUT.distill-state)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the newest saved training state")
    p.set_defaults(handler=_distill)


def add_config_flags(p) -> None:
    """One flag per DistillConfig field (``--keep-every`` for ``keep_every``), its help and default from the field.

    Flags left out stay out of the namespace (argparse.SUPPRESS), so the config's own defaults apply.
    """
    import argparse
    from dataclasses import MISSING, fields

    from weightsmith.compress.distill.config import DistillConfig

    types = {"int": int, "float": float, "str": str, "tuple[int, ...]": _ints}
    for f in fields(DistillConfig):
        flag, text = "--" + f.name.replace("_", "-"), f.metadata["help"]
        default = None if f.default is MISSING else f.default
        kind = str(f.type).replace(" | None", "")
        if kind == "bool":
            if default:
                p.add_argument(
                    f"--no-{flag[2:]}", dest=f.name, action="store_false", default=argparse.SUPPRESS, help=text
                )
            else:
                p.add_argument(flag, dest=f.name, action="store_true", default=argparse.SUPPRESS, help=text)
            continue
        shown = f" (default {default})" if default not in (None, ()) else ""
        p.add_argument(
            flag,
            dest=f.name,
            type=types[kind],
            choices=f.metadata.get("choices"),
            default=argparse.SUPPRESS,
            help=text + shown,
        )


def config_options(args) -> dict:
    """The DistillConfig fields given on the command line."""
    from dataclasses import fields

    from weightsmith.compress.distill.config import DistillConfig

    return {f.name: getattr(args, f.name) for f in fields(DistillConfig) if hasattr(args, f.name)}


def _distill(args):
    from weightsmith.compress.distill import distill, make_config

    report = distill(
        args.teacher,
        args.out,
        args.data,
        make_config(**config_options(args)),
        state_dir=args.state_dir,
        resume=args.resume,
        dtype=args.dtype,
        force=args.force,
    )
    # under accelerate launch every process returns a report; only the main process prints one
    return report if report.details["process"]["main"] else None
