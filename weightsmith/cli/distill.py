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
        "Run under 'accelerate launch' to train data-parallel on several GPUs, CPUs or nodes.",
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
    p.add_argument("--data", required=True, help="training text: .txt (one document per line) or .jsonl ('text')")
    add_output_options(p, inputs=("teacher", "student"), shards=False)
    who = p.add_mutually_exclusive_group()
    who.add_argument("--student", help="student checkpoint (e.g. a pruned model) with the teacher's vocabulary")
    who.add_argument("--layers", type=_ints, help="build the student from these teacher layers, e.g. 0,2,4")
    who.add_argument("--keep-every", type=int, help="build the student from every k-th teacher layer (0, k, 2k, …)")
    p.add_argument("--eval-data", help="held-out text (.txt/.jsonl) evaluated every --eval-every steps and at the end")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the teacher's)")
    p.add_argument("--temperature", type=float, default=2.0, help="softmax temperature T of the KD term (default 2)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the KD term; 1-alpha weighs CE (default 0.5)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (default: one epoch)")
    length.add_argument("--epochs", type=float, help="passes over the training text")
    p.add_argument("--batch-size", type=int, default=8, help="examples per process and step (default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per example (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--feature-layers",
        type=_ints,
        help="student layers whose outputs also match the teacher's (learned projection if widths differ)",
    )
    p.add_argument("--feature-weight", type=float, default=1.0, help="weight of the feature loss (default 1)")
    p.add_argument(
        "--freeze-embeddings",
        action="store_true",
        help="keep the student's input token embeddings at the teacher's (fewer trained parameters)",
    )
    p.add_argument(
        "--mixed-precision",
        choices=("no", "bf16"),
        default="no",
        help="bf16: both forwards under bf16 autocast (weights and optimizer stay float32; default no)",
    )
    p.add_argument(
        "--no-group-by-length",
        dest="group_by_length",
        action="store_false",
        help="batches in plain shuffled order instead of grouped by length",
    )
    p.add_argument("--eval-every", type=int, help="steps between held-out evaluations")
    p.add_argument("--save-every", type=int, help="steps between saved training states (for --resume)")
    p.add_argument("--state-dir", help="where training states go (default OUT.distill-state)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the newest saved training state")
    p.set_defaults(handler=_distill)


def _distill(args):
    from weightsmith.compress.distill import distill

    report = distill(
        args.teacher,
        args.out,
        args.data,
        student=args.student,
        layers=args.layers,
        keep_every=args.keep_every,
        eval_data=args.eval_data,
        tokenizer=args.tokenizer,
        temperature=args.temperature,
        alpha=args.alpha,
        lr=args.lr,
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=args.seed,
        feature_layers=args.feature_layers,
        feature_weight=args.feature_weight,
        eval_every=args.eval_every,
        save_every=args.save_every,
        state_dir=args.state_dir,
        resume=args.resume,
        dtype=args.dtype,
        group_by_length=args.group_by_length,
        freeze_embeddings=args.freeze_embeddings,
        mixed_precision=args.mixed_precision,
        force=args.force,
    )
    # under accelerate launch every process returns a report; only the main process prints one
    return report if report.details["process"]["main"] else None
