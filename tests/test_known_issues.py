"""TensorFlow kernel bugs the package routes around, pinned in plain TensorFlow.

Each test runs the minimal reproduction of docs/known-issues.md in a subprocess
(a crash there must not take the test process down) and checks that the bug is
still there where it is expected. When a TensorFlow release fixes it, the test
fails with a message saying so: then the workaround can be reconsidered and the
page updated.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# oneDNN's brgemm matmul for AVX-512 cores needs these four extensions.
_AVX512_CORE = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _run_plain_tensorflow(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with this process's environment (oneDNN as given)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.skipif(sys.platform != "linux", reason="reads the CPU flags from /proc/cpuinfo")
def test_onednn_broadcast_batch_matmul_is_still_broken_on_avx512():
    """`(4, 1, 12, 12) @ (1, 1, 12, 16)` with 2 threads: wrong rows or heap corruption.

    Runs with the environment as given (TensorFlow's default turns oneDNN on for
    AVX512_VNNI/BF16/AMX CPUs; CI's two passes force it on, then off). Where
    oneDNN is active on a CPU with AVX-512 cores the bug must show; elsewhere
    (oneDNN off, or another kernel) the product must be exact.
    """
    completed = _run_plain_tensorflow(
        """
        import numpy as np
        import tensorflow as tf
        from tensorflow.python.util import _pywrap_util_port

        print("onednn", bool(_pywrap_util_port.IsMklEnabled()), flush=True)
        tf.config.threading.set_intra_op_parallelism_threads(2)
        wrong = 0
        for _ in range(20):
            product = tf.matmul(tf.ones((4, 1, 12, 12)), tf.ones((1, 1, 12, 16))).numpy()
            wrong += not np.array_equal(product, np.full((4, 1, 12, 16), 12.0, np.float32))
        print("wrong", wrong, flush=True)
        """
    )
    assert "onednn " in completed.stdout, completed.stderr[-2000:]  # the import itself worked
    broken = completed.returncode != 0 or "wrong 0" not in completed.stdout
    if "onednn True" in completed.stdout and _AVX512_CORE <= _cpu_flags():
        assert broken, (
            "The oneDNN broadcast batch-matmul bug no longer reproduces with this "
            "TensorFlow: update docs/known-issues.md (the rank-2 matmuls in "
            "image.upsample_maps can stay; they are as fast)."
        )
    else:
        assert not broken, f"{completed.stdout}\n{completed.stderr[-2000:]}"


# ------------------------------------------------ the package avoids the pattern


def _matmul_problems(graph, seen: set[str]) -> list[str]:
    """Batched products in a graph and the functions it calls that could broadcast.

    An `Einsum` must not use `...` (it broadcasts); a `BatchMatMul*` must have
    operands of one rank whose static batch sizes never pair 1 with another size.
    """
    problems = []
    for op in graph.get_operations():
        if op.type == "Einsum":
            equation = op.get_attr("equation").decode()
            if "..." in equation:
                problems.append(f"{op.name}: Einsum {equation!r} broadcasts over '...'")
        elif op.type.startswith("BatchMatMul"):
            left, right = (tensor.shape for tensor in op.inputs)
            if left.rank is None or right.rank is None or left.rank != right.rank:
                problems.append(f"{op.name}: {op.type} of ranks {left.rank} and {right.rank}")
                continue
            for a, b in zip(left[:-2], right[:-2], strict=True):
                if (a == 1) != (b == 1) or (a is None) != (b is None):
                    problems.append(f"{op.name}: {op.type} batch axes {left} and {right}")
                    break
    for name, function in list(getattr(graph, "_functions", {}).items()):
        inner = getattr(function, "graph", None)
        if name not in seen and inner is not None:
            seen.add(name)
            problems += _matmul_problems(inner, seen)
    return problems


def _explainers(model):
    import tf_gradcam
    from tf_gradcam.layerwise import MultiLayerGradCAM

    return {
        "GradCAM": (tf_gradcam.GradCAM(model, "last_conv"), lambda r: r.heatmaps),
        "GradCAM relu=False": (
            tf_gradcam.GradCAM(model, "last_conv", relu=False),
            lambda r: r.heatmaps,
        ),
        "GuidedBackprop": (tf_gradcam.GuidedBackprop(model), lambda r: r.gradients),
        "GuidedGradCAM": (tf_gradcam.GuidedGradCAM(model, "last_conv"), lambda r: r.gradients),
        "DeconvolutionGradCAM": (
            tf_gradcam.DeconvolutionGradCAM(model, "last_conv"),
            lambda r: r.gradients,
        ),
        "MultiLayerGradCAM": (
            MultiLayerGradCAM(model, ["conv1", "last_conv"]),
            lambda r: sum(e.heatmaps for e in r.values()),
        ),
        "XGradCAM": (tf_gradcam.XGradCAM(model, "last_conv"), lambda r: r.heatmaps),
        "HiResCAM": (tf_gradcam.HiResCAM(model, "last_conv"), lambda r: r.heatmaps),
        "LayerCAM": (tf_gradcam.LayerCAM(model, "conv1"), lambda r: r.heatmaps),
        "GradCAMPlusPlus": (tf_gradcam.GradCAMPlusPlus(model, "last_conv"), lambda r: r.heatmaps),
        "EigenCAM": (tf_gradcam.EigenCAM(model, "last_conv"), lambda r: r.heatmaps),
    }


@pytest.mark.parametrize("target", [None, 2, "top2"])
def test_no_broadcast_batch_matmul_in_any_method_forward_or_backward(target):
    """Every method's compiled graph, and the gradient through it, avoids the broken op.

    The numbers of the bug depend on the CPU; this check does not: it reads the
    ops TensorFlow traced for the forward step and for its gradient.
    """
    import numpy as np
    import tensorflow as tf
    from conftest import make_cnn

    import tf_gradcam

    model = make_cnn()
    images = tf.constant(np.random.default_rng(0).random((3, 16, 16, 3), np.float32))
    resolved = tf_gradcam.TopK(2) if target == "top2" else target
    for name, (explainer, field) in _explainers(model).items():

        @tf.function
        def gradient(x, explainer=explainer, field=field):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(field(explainer.compute(x, target=resolved)))
            return tape.gradient(loss, x)

        graph = gradient.get_concrete_function(images).graph
        assert _matmul_problems(graph, set()) == [], name
