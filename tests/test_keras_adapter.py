"""The Keras internals the engine relies on, checked against the installed Keras."""

from __future__ import annotations

import keras

from tf_gradcam import keras_adapter


def test_every_keras_internal_the_engine_uses_still_holds():
    """After a Keras upgrade this names the assumption that broke and the version."""
    problems = keras_adapter.check_internals()
    assert problems == [], "\n".join(problems)


def test_a_broken_assumption_is_reported_with_the_keras_version(monkeypatch):
    """Hide `_run_through_graph` as a future Keras might: the check says so, with the version."""
    inputs = keras.Input((2,))
    functional = type(keras.Model(inputs, keras.layers.Dense(1)(inputs)))
    for cls in functional.__mro__:
        if "_run_through_graph" in vars(cls):
            monkeypatch.delattr(cls, "_run_through_graph")
    problems = keras_adapter.check_internals()
    assert any(
        p.startswith(f"Keras {keras.__version__}:") and "_run_through_graph" in p for p in problems
    ), problems


def test_no_other_module_touches_keras_internals():
    """`keras.src`, `_run_through_graph`, `object.__new__` appear only in the adapter."""
    from pathlib import Path

    package = Path(keras_adapter.__file__).parent
    markers = ("keras.src", "_run_through_graph", "object.__new__", "__mro__")
    offenders = [
        f"{path.name}: {marker}"
        for path in package.glob("*.py")
        if path.name != "keras_adapter.py"
        for marker in markers
        if marker in path.read_text()
    ]
    assert offenders == []
