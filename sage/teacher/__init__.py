"""The teacher: GR00T N1.5's vision-language backbone, rebuilt from transformers classes.

    presets.py    architecture sizes: groot-n1.5 (real) and groot-n1.5-tiny (random weights, CPU)
    backbone.py   the nn.Module (SigLIP -> Linear -> 12-layer Qwen3) and how it is materialised
    loading.py    the backbone's tensors out of a local GR00T checkpoint, by key prefix, strictly
    tokenizer.py  the Qwen2-style BPE tokenizer from a local directory (or the tiny preset's built-in)
    prompt.py     views (which grids the teacher sees) and the chat prompt around the images
    render.py     grid -> 224x224 RGB image
    extract.py    batches of prompts -> features -> the feature cache (sage/features.py)

Importing this package is cheap: torch and transformers load only when a model is built.
"""

from sage.errors import TeacherError
from sage.teacher.config import TeacherConfig

__all__ = ["TeacherConfig", "TeacherError"]
