"""Loading what a verb wrote with transformers, failing on any missing, mismatched or unexpected key."""

from __future__ import annotations

from pathlib import Path


def load_checked(model_class, path: str | Path, **kwargs):
    """``model_class.from_pretrained(path, **kwargs)`` (a class or its name in transformers), in eval mode; fails the
    test when transformers' load report names any missing, mismatched or unexpected key (a missing key is
    initialised at random: the model would load and silently compute garbage)."""
    import transformers

    if isinstance(model_class, str):
        model_class = getattr(transformers, model_class)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    problems = {k: sorted(map(str, info.get(k) or [])) for k in ("missing_keys", "mismatched_keys", "unexpected_keys")}
    problems = {k: v for k, v in problems.items() if v}
    assert not problems, f"{model_class.__name__}.from_pretrained({path}): {problems}"
    return model.eval()
