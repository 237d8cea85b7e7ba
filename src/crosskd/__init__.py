"""crosskd: cross-tokenizer knowledge distillation for causal language models.

For notebooks and scripts::

    import crosskd

    result = crosskd.distill("configs/reference.yaml", overrides=["training.max_steps=10"])
    print(result.best_bpb, result.student_dir)

`distill` takes a config path, a mapping of sections or a `Config`; `load_config` builds one the same way
(docs/TRAINING.md). The `crosskd` command is a thin layer over the same functions.
"""

__version__ = "0.1.0"

import crosskd.testing.tiny_models  # noqa: E402,F401  (registers the `tiny:` model pair)
import crosskd.vocab  # noqa: E402,F401  (registers the built-in vocabulary transfers and their config checks)
from crosskd.api import TrainResult, cache_teacher, distill, load_config, write_teacher_text  # noqa: E402

__all__ = ["TrainResult", "cache_teacher", "distill", "load_config", "write_teacher_text"]
