"""BaseImageProcessor: both image processors read and write their folders the same way, as transformers does."""

import json

import pytest

from herd.image_processing_utils import BaseImageProcessor, read_image_processor_config
from herd.models.llama4 import Llama4ImageProcessorFast
from herd.models.mllama import MllamaImageProcessor

# Every setting away from its default, so that a field lost on the way shows.
SHARED_SETTINGS = {
    "do_convert_rgb": False,
    "size": {"height": 56, "width": 56},
    "resample": 3,
    "do_rescale": False,
    "rescale_factor": 0.5,
    "do_normalize": False,
    "image_mean": [0.1, 0.2, 0.3],
    "image_std": [0.4, 0.5, 0.6],
}
NON_DEFAULT = {
    MllamaImageProcessor: {**SHARED_SETTINGS, "max_image_tiles": 3},
    Llama4ImageProcessorFast: {**SHARED_SETTINGS, "do_resize": False, "max_patches": 9, "resize_to_max_canvas": True},
}
PROCESSORS = list(NON_DEFAULT)


@pytest.mark.parametrize("cls", PROCESSORS, ids=lambda cls: cls.__name__)
def test_round_trip_keeps_every_field(tmp_path, cls):
    assert issubclass(cls, BaseImageProcessor)
    # The Mllama settings it cannot run without (do_pad, do_resize) are the only ones left at their default.
    assert set(cls.defaults) - set(NON_DEFAULT[cls]) <= {"do_pad", "do_resize"}
    processor = cls(**NON_DEFAULT[cls], my_unknown_setting={"kept": [1, 2]})
    processor.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    for name, value in NON_DEFAULT[cls].items():
        assert getattr(loaded, name) == value, name
    assert loaded.to_dict() == processor.to_dict()
    assert loaded.to_dict()["my_unknown_setting"] == {"kept": [1, 2]}
    assert loaded.my_unknown_setting == {"kept": [1, 2]}  # an attribute too, as in transformers
    with pytest.raises(AttributeError, match="no attribute 'not_a_setting'"):
        loaded.not_a_setting
    assert repr(loaded).startswith(f"{cls.__name__} {{")


@pytest.mark.parametrize("cls", PROCESSORS, ids=lambda cls: cls.__name__)
def test_both_write_the_same_layout(tmp_path, cls):
    written = cls().save_pretrained(tmp_path)
    assert written == [str(tmp_path / "preprocessor_config.json")]
    assert [path.name for path in tmp_path.iterdir()] == ["preprocessor_config.json"]
    text = (tmp_path / "preprocessor_config.json").read_text()
    saved = json.loads(text)
    # transformers' to_json_string: sorted keys, two-space indent, a final newline.
    assert text == json.dumps(saved, indent=2, sort_keys=True) + "\n"
    assert saved == {**cls.defaults, "image_processor_type": cls.__name__}


@pytest.mark.parametrize("cls", PROCESSORS, ids=lambda cls: cls.__name__)
def test_keyword_arguments_override_saved_values(tmp_path, cls):
    cls(**NON_DEFAULT[cls]).save_pretrained(tmp_path)
    override = {"size": {"height": 28, "width": 28}, "image_mean": [0.7, 0.7, 0.7]}
    loaded = cls.from_pretrained(tmp_path, **override)
    assert loaded.size == override["size"] and loaded.image_mean == override["image_mean"]
    assert loaded.image_std == NON_DEFAULT[cls]["image_std"]
    assert cls.from_dict(read_image_processor_config(tmp_path), **override).to_dict() == loaded.to_dict()
    # A JSON file path works too, and None means the default, as in transformers.
    from_file = cls.from_pretrained(tmp_path / "preprocessor_config.json", rescale_factor=None)
    assert from_file.rescale_factor == cls.defaults["rescale_factor"]


@pytest.mark.parametrize("cls", PROCESSORS, ids=lambda cls: cls.__name__)
def test_nested_processor_config_wins(tmp_path, cls):
    cls().save_pretrained(tmp_path)
    nested = {"image_processor": {"size": {"height": 28, "width": 28}}, "processor_class": "SomeProcessor"}
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    assert cls.from_pretrained(tmp_path).size == {"height": 28, "width": 28}


def test_folder_written_by_transformers_loads_with_the_same_fields(tmp_path):
    import transformers

    settings = NON_DEFAULT[MllamaImageProcessor]
    reference = transformers.MllamaImageProcessor(**settings)
    reference.save_pretrained(tmp_path)
    loaded = MllamaImageProcessor.from_pretrained(tmp_path)
    # Compared as JSON values: transformers keeps image_mean and image_std as tuples in memory.
    expected = json.loads(reference.to_json_string())
    for name in MllamaImageProcessor.defaults:
        assert getattr(loaded, name) == expected[name], name
    assert loaded.to_dict() == json.loads((tmp_path / "preprocessor_config.json").read_text())


def test_bad_files_and_values_fail_in_one_line(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(OSError, match="is not valid JSON") as error:
        MllamaImageProcessor.from_pretrained(tmp_path)
    assert "\n" not in str(error.value)
    (tmp_path / "preprocessor_config.json").write_text("[1, 2]")
    with pytest.raises(OSError, match="must hold a JSON object, got list"):
        Llama4ImageProcessorFast.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"max_image_tiles": 0}))
    with pytest.raises(ValueError, match="`max_image_tiles` must be a positive integer, got 0") as error:
        MllamaImageProcessor.from_pretrained(tmp_path)
    assert "\n" not in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="no image processor config"):
        Llama4ImageProcessorFast.from_pretrained(tmp_path / "empty")
