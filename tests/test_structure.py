"""The package's shape: no import cycles between its modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tf_gradcam"


def _imports(path: Path) -> set[str]:
    """`tf_gradcam` modules a module imports, at any depth (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("tf_gradcam."):
                found.add(node.module.split(".")[1])
            elif node.module == "tf_gradcam":  # `from tf_gradcam import submodule`
                found.update(a.name for a in node.names if (PACKAGE / f"{a.name}.py").exists())
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tf_gradcam."):
                    found.add(alias.name.split(".")[1])
    return found


def _graph() -> dict[str, set[str]]:
    return {
        path.stem: _imports(path) - {path.stem}
        for path in PACKAGE.glob("*.py")
        if path.stem != "__init__"  # it imports lazily (PEP 562), at first attribute use
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for dependency in sorted(graph.get(module, ())):
            if state.get(dependency) == "open":
                cycles.append([*stack[stack.index(dependency) :], dependency])
            elif dependency not in state:
                visit(dependency, [*stack, dependency])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_the_walker_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]


def test_no_import_cycle_between_modules():
    graph = _graph()
    assert {"gradcam", "guided", "relu_rules", "submodel"} <= set(graph)
    assert _cycles(graph) == []


def test_the_relu_rules_are_a_leaf_below_the_engine():
    """relu_rules needs only the rewiring, the capture, the errors and the Keras adapter.

    The capture of subclassed models is itself a leaf over the errors, the adapter, the
    token layouts and the image helpers (a leaf too).
    """
    graph = _graph()
    assert graph["relu_rules"] <= {"errors", "keras_adapter", "submodel", "capture"}
    assert graph["capture"] <= {"errors", "keras_adapter", "tokens", "image"}
    assert graph["tokens"] <= {"errors"}
    assert graph["image"] == set()
    assert graph["keras_adapter"] == set()
    assert "guided" not in graph["gradcam"]


def test_methods_are_siblings_over_one_engine():
    """GradCAM, MultiLayerGradCAM and the input-gradient engine share the Engine, not GradCAM."""
    from tf_gradcam.engine import Engine
    from tf_gradcam.gradcam import GradCAM
    from tf_gradcam.guided import _InputGradients
    from tf_gradcam.layerwise import MultiLayerGradCAM

    for method in (GradCAM, MultiLayerGradCAM, _InputGradients):
        assert issubclass(method, Engine)
    for sibling in (MultiLayerGradCAM, _InputGradients):
        assert not issubclass(sibling, GradCAM)


def test_data_set_and_callback_use_only_the_engines_documented_members():
    """`explain_dataset` builds on `built`, `build`, `num_classes`, `input_signature`,
    `compiled_step` and `to_explanation`, never on an explainer's private members."""
    import re

    for name in ("dataset.py", "callback.py"):
        text = (PACKAGE / name).read_text()
        private = sorted(set(re.findall(r"\b(?:cam|explainer|engine)\._[a-z]\w*", text)))
        assert private == [], f"{name}: {private}"


def test_a_variant_overrides_one_step():
    """The docs' PositiveGradCAM: α = mean of ReLU(∂y/∂A), checked on a GAP → Dense head.

    There ∂y_c/∂A_ij^k = W[k, c] / Z everywhere, so α_k = max(W[k, c], 0) / Z, and the
    variant inherits targets, TopK and compilation from the engine.
    """
    import numpy as np
    import tensorflow as tf
    from conftest import make_cnn

    import tf_gradcam

    class PositiveGradCAM(tf_gradcam.GradCAM):
        def channel_weights(self, activations, gradients):
            return tf.reduce_mean(tf.nn.relu(gradients), axis=[2, 3])

    model = make_cnn(activation=None)
    images = np.random.default_rng(0).random((3, 16, 16, 3), dtype=np.float32)
    cam = PositiveGradCAM(model, "last_conv")
    result = cam(images, target=1)
    kernel = model.get_layer("head").kernel.numpy()[:, 1]
    assert (kernel < 0).any()  # the variant differs from Grad-CAM here
    np.testing.assert_allclose(
        result.weights, np.tile(np.maximum(kernel, 0) / 144, (3, 1)), rtol=1e-5
    )
    top = cam(images, target=tf_gradcam.TopK(2))
    assert top.weights.shape == (3, 2, 5) and (top.weights >= 0).all()
    assert cam.trace_count == 2
