"""The distillation config: one frozen, keyword-only value with every training choice (torch-free: the CLI builds
its flags from these fields, their ``help`` metadata and defaults)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from weightsmith.errors import ConfigError

MIXED_PRECISION = ("no", "bf16")
# fields naming the student and the data beside the training text; the rest are the training hyper-parameters
SELECTION = ("student", "layers", "keep_every", "eval_data", "tokenizer")


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """What to distil into and how (the training state saved for ``resume`` records the hyper-parameters; a resume
    must match). Exactly one of ``student`` / ``layers`` / ``keep_every`` chooses the student."""

    student: str | None = _opt(None, "student checkpoint (e.g. a pruned model) with the teacher's vocabulary")
    layers: tuple[int, ...] | None = _opt(None, "build the student from these teacher layers, e.g. 0,2,4")
    keep_every: int | None = _opt(None, "build the student from every k-th teacher layer (0, k, 2k, …)")
    eval_data: str | None = _opt(
        None, "held-out data (as the training data) evaluated every eval_every steps and at the end"
    )
    tokenizer: str | None = _opt(None, "tokenizer directory (default: the teacher's)")
    # DistilBERT's T: soft enough to carry the teacher's ranking of wrong answers
    temperature: float = _opt(2.0, "softmax temperature T of the KD term")
    alpha: float = _opt(0.5, "weight of the KD term; 1 - alpha weighs CE")
    # AdamW; layer-dropped students start close to the teacher, so a fine-tuning rate
    lr: float = _opt(1e-4, "AdamW learning rate")
    steps: int | None = _opt(None, "optimizer steps (default: one epoch)")
    epochs: float | None = _opt(None, "passes over the training data, when steps is not given")
    # per process: the global batch is batch_size × processes, as accelerate counts it
    batch_size: int = _opt(8, "examples per process and step")
    seq_len: int = _opt(128, "tokens per example (truncation for encoders, packing block for causal LMs)")
    seed: int = _opt(0, "data order, masking and any fresh projection weights")
    feature_layers: tuple[int, ...] = _opt(
        (), "student layers whose outputs also match the teacher's (learned projection if widths differ)"
    )
    feature_weight: float = _opt(1.0, "weight of the feature loss")
    # images and seq2seq: the final hidden states match the teacher's too (DistilBERT's hidden-state term)
    hidden_weight: float = _opt(1.0, "image classification and seq2seq: weight of the final hidden-state MSE")
    eval_every: int | None = _opt(None, "steps between held-out evaluations (always one at the end)")
    save_every: int | None = _opt(None, "steps between saved training states (for resume)")
    warmup: float = _opt(0.05, "fraction of steps with a linearly rising learning rate")
    weight_decay: float = _opt(0.01, "AdamW weight decay, on matrices only (as BERT and GPT training do)")
    max_grad_norm: float = _opt(1.0, "gradient norm clip")
    # batches of similar-length examples: less padding, same examples per epoch
    group_by_length: bool = _opt(True, "batches of similar-length examples (off: plain shuffled order)")
    freeze_embeddings: bool = _opt(
        False, "keep the student's input token embeddings at the teacher's (fewer trained parameters)"
    )
    mixed_precision: str = _opt(
        "no", "bf16: both forwards under bf16 autocast (weights and optimizer stay float32)", choices=MIXED_PRECISION
    )

    def __post_init__(self) -> None:
        for name in ("layers", "feature_layers"):  # lists from YAML or JSON become tuples: the value stays frozen
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        self._check_student()
        self._check_training()

    def _check_student(self) -> None:
        if self.layers is not None and self.keep_every is not None:
            raise ConfigError("give either `layers` or `keep_every`, not both")
        if self.student is not None and (self.layers is not None or self.keep_every is not None):
            raise ConfigError("give either a `student` checkpoint or `layers`/`keep_every`, not both")
        if self.student is None and self.layers is None and self.keep_every is None:
            raise ConfigError("no student: give a `student` checkpoint, or `layers` / `keep_every` to build one")
        if self.keep_every is not None and self.keep_every < 1:
            raise ConfigError(f"keep_every {self.keep_every}: must be at least 1")

    def _check_training(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature {self.temperature}: must be positive")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha {self.alpha}: must lie in [0, 1]")
        if self.lr <= 0:
            raise ConfigError(f"lr {self.lr}: must be positive")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give either `steps` or `epochs`, not both")
        if self.steps is not None and self.steps <= 0:
            raise ConfigError(f"steps {self.steps}: must be at least 1")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs {self.epochs}: must be positive")
        for name in ("batch_size", "seq_len", "eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} {value}: must be at least 1")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len {self.seq_len}: must be at least 2")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup {self.warmup}: must lie in [0, 1)")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed_precision {self.mixed_precision!r}: expected one of {', '.join(MIXED_PRECISION)}")
        if any(i < 0 for i in self.feature_layers):
            raise ConfigError(f"feature_layers {list(self.feature_layers)}: indices must be non-negative")
        if self.hidden_weight < 0 or self.feature_weight < 0:
            raise ConfigError("`hidden_weight` and `feature_weight` must be non-negative")

    def hyper(self) -> dict[str, Any]:
        """The training hyper-parameters (everything but the student and data choices), as the saved state
        records them."""
        return {k: v for k, v in asdict(self).items() if k not in SELECTION}


def make_config(config: DistillConfig | dict | None = None, **options: Any) -> DistillConfig:
    """A config from a value, a dict (recipes, JSON) or keyword options; an unknown option is refused with the
    valid ones."""
    if isinstance(config, DistillConfig):
        if options:
            raise ConfigError(f"pass options inside the config value, not beside it ({', '.join(options)})")
        return config
    options = {**(config or {}), **options}
    valid = [f.name for f in fields(DistillConfig)]
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise ConfigError(f"distill: unknown option(s) {', '.join(unknown)} (valid: {', '.join(valid)})")
    return DistillConfig(**options)
