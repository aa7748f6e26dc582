"""The teacher: GR00T N1.5's vision-language backbone, rebuilt from transformers classes.

    presets.py    architecture sizes: groot-n1.5 (real) and groot-n1.5-tiny (random weights, CPU)
    backbone.py   the nn.Module (SigLIP -> Linear -> 12-layer Qwen3) and how it is materialised
    loading.py    the backbone's tensors out of a local GR00T checkpoint, by key prefix, strictly
    tokenizer.py  the Qwen2-style BPE tokenizer from a local directory (or the tiny preset's built-in)
    settings.py   the `teacher:` config section, the views, and the help texts for missing files
    prompt.py     views (which grids the teacher sees), the chat prompt around the images, and the
                  features a teacher returns for a prompt
    render.py     grid -> 224x224 RGB image
    groot.py      GR00T N1.5 as a teacher: batches of prompts -> per-grid features
    oracle.py     a teacher that knows each synthetic task's hidden rule (does distillation carry it?)

sage/extraction.py runs a teacher over a dataset into the feature cache (sage/features.py).

Importing this package is cheap: torch and transformers load only when a model is built.
"""

from sage.errors import TeacherError
from sage.teacher.settings import TeacherConfig

__all__ = ["TeacherConfig", "TeacherError"]
