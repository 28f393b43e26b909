"""The quality study's benchmark with built-in redundancy, for core-set selection (Face-NMS).

The world of ``configs/study.py`` in which each image (after an identity's first) repeats
an earlier shot of its identity with probability 0.4 (same pose, light, occlusion and
blur, fresh pixel noise): the near duplicates of a web-crawled dataset. The level was
fixed before any pruning was run, from the paper's claim (WebFace42M cut to 60 % without
loss), and not changed after. See the README's "Pruning a dataset: Face-NMS".

    python -m pfc_jax.data.prune --source config:configs/study_redundant.py --workdir PROXY \
        --keep-ratio 0.6 --out /tmp/core
"""

import pathlib
import runpy

study = runpy.run_path(str(pathlib.Path(__file__).with_name("study.py")))


def get_config():
    c = study["get_config"]()
    c.data.hard_synthetic.duplicates = 0.4
    return c
