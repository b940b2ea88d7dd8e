"""Pure-torch core of the embedding-nudging pack: no ComfyUI imports, testable on its own."""
from .embedding_set import EmbeddingSet, load_set, save_set  # noqa: F401
from .errors import NudgeInputError  # noqa: F401
from .memorization import Verdict, check_pixels, merge_regenerated  # noqa: F401
from .nudge import NudgeSettings, nudge_latents  # noqa: F401
from .tiled_l2 import tiled_l2, tiled_l2_matrix  # noqa: F401
