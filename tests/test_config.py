"""The config dataclass, its presets and validation, and the per-step Adam scalars."""
import numpy as np
import pytest

from backends.contract import (PRESETS, ConfigError, GPTConfig, ParameterLayout, adam_step,
                               parameter_shapes, preset)


def test_tiny_is_the_spec_default():
    tiny = preset("tiny")
    assert (tiny.n_layer, tiny.n_embd, tiny.n_head, tiny.block_size) == (1, 16, 4, 16)
    assert (tiny.learning_rate, tiny.beta1, tiny.beta2, tiny.eps) == (0.01, 0.85, 0.99, 1e-8)
    assert (tiny.num_steps, tiny.temperature, tiny.num_samples) == (1000, 0.5, 20)
    assert tiny.num_parameters(vocab_size=27) == 4192


def test_presets_grow():
    sizes = [PRESETS[name].num_parameters(27) for name in ("tiny", "small", "medium", "large")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    for field in ("n_layer", "n_embd", "block_size"):
        values = [getattr(PRESETS[name], field) for name in ("tiny", "small", "medium", "large")]
        assert values == sorted(values) and values[0] < values[-1]


@pytest.mark.parametrize("changes, field", [
    ({"n_embd": 10, "n_head": 4}, "n_embd"),
    ({"n_layer": 0}, "n_layer"),
    ({"block_size": -1}, "block_size"),
    ({"num_steps": 0}, "num_steps"),
    ({"n_head": 0}, "n_head"),
    ({"batch_size": 0}, "batch_size"),
    ({"beta1": 1.0}, "beta1"),
    ({"learning_rate": 0}, "learning_rate"),
])
def test_invalid_config_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        GPTConfig(**changes)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="tiny.*small.*medium.*large"):
        preset("huge")


def test_unknown_field_is_rejected():
    with pytest.raises(ConfigError, match="n_embedding"):
        GPTConfig.from_dict({"n_embedding": 3})
    with pytest.raises(ConfigError):
        preset("tiny", n_embedding=3)


def test_round_trip_through_dict():
    config = preset("small", num_steps=7)
    assert GPTConfig.from_dict(config.to_dict()) == config


def test_parameter_order_is_the_spec_draw_order():
    names = [name for name, _ in parameter_shapes(preset("tiny", n_layer=2), 27)]
    assert names[:3] == ["wte", "wpe", "lm_head"]
    assert names[3:9] == ["layer0.attn_wq", "layer0.attn_wk", "layer0.attn_wv",
                          "layer0.attn_wo", "layer0.mlp_fc1", "layer0.mlp_fc2"]
    assert names[9] == "layer1.attn_wq"


def test_adam_step_scalars():
    config = preset("tiny")
    first, last = adam_step(config, 0), adam_step(config, 999)
    assert first.learning_rate == 0.01
    assert last.learning_rate == pytest.approx(0.01 * (1 - 999 / 1000))
    assert first.bias_correction1 == pytest.approx(0.15)
    assert first.bias_correction2 == pytest.approx(0.01)


def test_the_flat_layout_is_the_draw_order_row_major():
    layout = ParameterLayout.for_config(preset("tiny", n_layer=2), 27)
    assert [name for name, _, _ in layout.entries] == [
        name for name, _ in parameter_shapes(preset("tiny", n_layer=2), 27)]
    assert layout.total == preset("tiny", n_layer=2).num_parameters(27)
    parameters = {name: np.arange(rows * cols, dtype=float).reshape(rows, cols) + offset
                  for name, (rows, cols), offset in layout.entries}
    flat = layout.flatten(parameters)
    np.testing.assert_array_equal(flat, np.arange(layout.total))  # each row-major, in order
    for name, view in layout.split(flat).items():
        np.testing.assert_array_equal(view, parameters[name])
    assert layout.span("wpe") == (27 * 16, 27 * 16 + 16 * 16)
    np.testing.assert_array_equal(layout.slice(flat, "layer1.attn_wq", "layer1.attn_wv"),
                                  flat[layout.span("layer1.attn_wq")[0]:
                                       layout.span("layer1.attn_wv")[1]])
