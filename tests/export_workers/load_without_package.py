"""Run an exported SavedModel in a process where tf_gradcam cannot be imported.

Usage: python load_without_package.py SAVED_MODEL INPUTS.npz OUT.npz

`tf_gradcam` is blocked before anything else runs (`sys.modules["tf_gradcam"] =
None` makes every import of it fail, whatever finder the editable install
added) and the repository is taken off `sys.path`; the script checks that the
import fails, then loads the SavedModel with `tf.saved_model.load` alone and
runs both signatures through the one loaded object: `explain` on the images
(`images`) and on their first image alone (a second batch size), and
`explain_classes` on the images and `classes`. It writes every output to
OUT.npz under `<signature>_<batch size>_<output>` and prints one JSON line:
whether the import was blocked, the signatures and their input names, and
which tf_gradcam modules ended up imported (none).
"""

from __future__ import annotations

import json
import os
import sys

sys.modules["tf_gradcam"] = None  # type: ignore[assignment]
repository = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != repository]
try:
    import tf_gradcam  # noqa: F401
except ImportError:
    blocked = True
else:  # pragma: no cover - the block failed
    blocked = False

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

saved_model, inputs_path, out_path = sys.argv[1:4]
with np.load(inputs_path) as data:
    images, classes = data["images"], data["classes"]
served = tf.saved_model.load(saved_model)
outputs = {}
for batch in (images, images[:1]):
    for key, value in served.signatures["explain"](images=tf.constant(batch)).items():
        outputs[f"explain_{len(batch)}_{key}"] = value.numpy()
given = served.signatures["explain_classes"](images=tf.constant(images), classes=classes)
for key, value in given.items():
    outputs[f"explain_classes_{len(images)}_{key}"] = value.numpy()
np.savez(out_path, **outputs)
print(
    json.dumps(
        {
            "blocked": blocked,
            "signatures": sorted(served.signatures),
            "inputs": {
                name: sorted(served.signatures[name].structured_input_signature[1])
                for name in served.signatures
            },
            "tf_gradcam_modules": sorted(
                name
                for name, module in sys.modules.items()
                if name.startswith("tf_gradcam") and module is not None
            ),
        }
    )
)
