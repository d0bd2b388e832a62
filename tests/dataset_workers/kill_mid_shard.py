"""A process killed (SIGKILL) in the middle of writing its second shard.

Usage: python kill_mid_shard.py MODEL.keras DATA.npz OUT_DIR

`np.savez` is replaced by a version that, for the second shard, writes half
of the file's bytes, flushes them to disk and kills the process, as a power
cut or an out-of-memory kill would. The caller then checks what the folder
holds.
"""

from __future__ import annotations

import io
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np

from tf_gradcam.dataset import explain_dataset

real_savez = np.savez
calls = []


def savez_then_die(file, *args, **kwds):
    calls.append(file)
    if len(calls) < 2:
        return real_savez(file, *args, **kwds)
    buffer = io.BytesIO()
    real_savez(buffer, *args, **kwds)
    data = buffer.getvalue()
    handle = file if hasattr(file, "write") else open(file, "wb")
    handle.write(data[: len(data) // 2])
    handle.flush()
    os.fsync(handle.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


np.savez = savez_then_die
model = keras.saving.load_model(sys.argv[1])
with np.load(sys.argv[2]) as data:
    images, labels = data["images"], data["labels"]
explain_dataset(model, (images, labels), "labels", batch_size=4, output_dir=sys.argv[3], verbose=0)
print("not killed", flush=True)
