"""le.save / le.load: round trips, and clear errors (never unpickling) on bad files."""

from __future__ import annotations

import io
import json
import pickle
import zipfile

import numpy as np
import pytest

import lstmeng as le

RNG = np.random.default_rng(0)
X = RNG.normal(size=(3, 6, 2)).astype("float32")
MASK = le.lengths_to_mask([6, 3, 1], maxlen=6)


def models():
    return {
        "LSTM": le.LSTM(4, activation="relu", recurrent_activation="hard_sigmoid", go_backwards=True,
                        return_sequences=True, zero_output_for_mask=True, seed=1, backend="numpy"),
        "LSTM no bias float64": le.LSTM(3, use_bias=False, dtype="float64", seed=2, backend="numpy"),
        "Bidirectional": le.Bidirectional(le.LSTM(3, return_sequences=True, seed=3, backend="numpy"),
                                          merge_mode="ave"),
        "Bidirectional explicit backward": le.Bidirectional(
            le.LSTM(3, return_sequences=True, seed=4, backend="numpy"),
            backward_layer=le.LSTM(2, return_sequences=True, go_backwards=True, activation="sigmoid", seed=5,
                                   backend="numpy")),
        "Sequential": le.Sequential([le.Bidirectional(le.LSTM(3, return_sequences=True, seed=6, backend="numpy")),
                                     le.Dropout(0.25, seed=7), le.LSTM(2, seed=8, backend="numpy")]),
    }


@pytest.mark.parametrize("name", list(models()))
def test_save_load_round_trip(name, tmp_path):
    model = models()[name]
    expected = model(X.astype(model.get_config().get("dtype", "float32")) if isinstance(model, le.LSTM) else X,
                     mask=MASK)
    path = tmp_path / "model.npz"
    le.save(model, path)
    loaded = le.load(path)
    assert type(loaded) is type(model)
    assert loaded.get_config() == model.get_config()
    for actual, original in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(actual, original)
        assert actual.dtype == original.dtype
    x = X.astype(model.get_config().get("dtype", "float32")) if isinstance(model, le.LSTM) else X
    np.testing.assert_array_equal(loaded(x, mask=MASK), expected)


def test_save_load_cell_and_unbuilt_layer(tmp_path):
    cell = le.LSTMCell(3, dropout=0.1, seed=9, backend="numpy").build(2)
    le.save(cell, tmp_path / "cell.npz")
    loaded = le.load(tmp_path / "cell.npz")
    assert isinstance(loaded, le.LSTMCell) and loaded.get_config() == cell.get_config()
    np.testing.assert_array_equal(loaded(X[:, 0])[0], cell(X[:, 0])[0])
    le.save(le.LSTM(5), str(tmp_path / "unbuilt.npz"))
    unbuilt = le.load(str(tmp_path / "unbuilt.npz"))
    assert not unbuilt.built and unbuilt.units == 5


def test_file_holds_json_and_plain_arrays_only(tmp_path):
    path = tmp_path / "model.npz"
    le.save(models()["Sequential"], path)
    with zipfile.ZipFile(path) as archive:
        names = sorted(archive.namelist())
    assert names[0] == "__lstmeng__.npy"
    with np.load(path, allow_pickle=False) as archive:  # would raise on any object array
        header = json.loads(str(archive["__lstmeng__"]))
        assert header["format"] == "lstmeng" and header["class_name"] == "Sequential"
        assert all(archive[name].dtype.kind == "f" for name in archive.files if name != "__lstmeng__")


def test_save_rejects_other_objects(tmp_path):
    with pytest.raises(TypeError, match="save expects one of"):
        le.save(object(), tmp_path / "x.npz")


# -- bad files -------------------------------------------------------------------------
class PayloadThatTouchesAFile:
    """Unpickling this creates ``path``: if the file appears, something unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def npz_bytes(**arrays):
    """An .npz written with allow_pickle (object arrays become pickles inside)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def valid_file_bytes(tmp_path):
    path = tmp_path / "valid.npz"
    le.save(models()["LSTM"].build(2), path)
    return path.read_bytes()


def header(**changes):
    document = {"format": "lstmeng", "version": 1, "class_name": "LSTM",
                "config": le.LSTM(2).get_config(), "input_size": None, "weights": 0}
    document.update(changes)
    return np.array(json.dumps(document))


def bad_files(tmp_path, flag):
    payload = PayloadThatTouchesAFile(flag)
    valid = valid_file_bytes(tmp_path)
    npy = io.BytesIO()
    np.save(npy, np.arange(3.0))
    return {
        "empty": b"",
        "truncated": valid[: len(valid) // 2],
        "truncated tail": valid[:-10],
        "text": b"hello, this is not a model\n",
        "plain npy": npy.getvalue(),
        "raw pickle": pickle.dumps(payload),
        "zip of junk": _zip({"junk.txt": b"\x00\x01 nothing here"}),
        "zip with junk npy": _zip({"__lstmeng__.npy": b"\x93NUMPY garbage"}),
        "npz without header": npz_bytes(weight_0=np.zeros(3)),
        "npz pickled header": npz_bytes(__lstmeng__=np.array([payload], dtype=object)),
        "npz pickled weight": npz_bytes(__lstmeng__=header(weights=1), weight_0=np.array([payload], dtype=object)),
        "npz header not json": npz_bytes(__lstmeng__=np.array("{not json")),
        "npz header numeric": npz_bytes(__lstmeng__=np.zeros(3)),
        "npz foreign format": npz_bytes(__lstmeng__=header(format="other")),
        "npz future version": npz_bytes(__lstmeng__=header(version=99)),
        "npz unknown class": npz_bytes(__lstmeng__=header(class_name="os.system")),
        "npz missing weight": npz_bytes(__lstmeng__=header(weights=3)),
        "npz negative count": npz_bytes(__lstmeng__=header(weights=-1)),
        "npz config not a dict": npz_bytes(__lstmeng__=header(config=[1, 2])),
        "npz config unknown option": npz_bytes(__lstmeng__=header(config={"units": 2, "evil": 1})),
        "npz config bad value": npz_bytes(__lstmeng__=header(config={"units": -2})),
        "npz sequential layers not dicts": npz_bytes(
            __lstmeng__=header(class_name="Sequential", config={"layers": ["LSTM"]})),
        "npz sequential unknown layer": npz_bytes(
            __lstmeng__=header(class_name="Sequential", config={"layers": [{"class_name": "Dense", "config": {}}]})),
        "npz bidirectional no layer": npz_bytes(__lstmeng__=header(class_name="Bidirectional", config={})),
        "npz weights disagree": npz_bytes(__lstmeng__=header(weights=3), weight_0=np.zeros((2, 8)),
                                          weight_1=np.zeros((3, 8)), weight_2=np.zeros(8)),
    }


def _zip(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


BAD_FILE_NAMES = ["empty", "truncated", "truncated tail", "text", "plain npy", "raw pickle", "zip of junk",
                  "zip with junk npy", "npz without header", "npz pickled header", "npz pickled weight",
                  "npz header not json", "npz header numeric", "npz foreign format", "npz future version",
                  "npz unknown class", "npz missing weight", "npz negative count", "npz config not a dict",
                  "npz config unknown option", "npz config bad value", "npz sequential layers not dicts",
                  "npz sequential unknown layer", "npz bidirectional no layer", "npz weights disagree"]


@pytest.mark.parametrize("kind", BAD_FILE_NAMES)
def test_load_bad_file_raises_clear_error_and_never_unpickles(kind, tmp_path):
    flag = tmp_path / "unpickled.flag"
    files = bad_files(tmp_path, flag)
    assert sorted(files) == sorted(BAD_FILE_NAMES)
    path = tmp_path / "model.npz"
    path.write_bytes(files[kind])
    with pytest.raises(ValueError) as info:
        le.load(path)
    message = str(info.value)
    assert str(path) in message and "lstmeng" in message, message
    assert not flag.exists(), "le.load unpickled part of the file"


def test_the_payload_does_create_the_flag_when_unpickled(tmp_path):
    """The guard of the test above is real: unpickling the payload creates the file."""
    flag = tmp_path / "unpickled.flag"
    pickle.loads(pickle.dumps(PayloadThatTouchesAFile(flag)))
    assert flag.exists()
    flag.unlink()
    with np.load(io.BytesIO(npz_bytes(x=np.array([PayloadThatTouchesAFile(flag)], dtype=object))),
                 allow_pickle=True) as archive:
        archive["x"]
    assert flag.exists()


def test_load_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no lstmeng file at .*missing.npz"):
        le.load(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="not an lstmeng"):
        le.load(tmp_path)


def test_callable_initializers(tmp_path):
    """A built layer's file holds its weights, so a callable initializer does not block saving."""
    model = le.Sequential([
        le.Bidirectional(le.LSTM(3, recurrent_initializer=lambda shape, rng: np.full(shape, 0.1),
                                 return_sequences=True, backend="numpy")),
        le.LSTM(2, kernel_initializer=lambda shape, rng: np.full(shape, -0.2), backend="numpy")]).build(2)
    le.save(model, tmp_path / "model.npz")
    loaded = le.load(tmp_path / "model.npz")
    np.testing.assert_array_equal(loaded(X), model(X))
    with pytest.raises(ValueError, match="unbuilt layer whose kernel_initializer is a callable"):
        le.save(le.LSTM(2, kernel_initializer=lambda shape, rng: np.zeros(shape)), tmp_path / "unbuilt.npz")


# -- weights against the config ------------------------------------------------------------
def shape_check_models():
    """Every class le.save writes, built, with every kind of sublayer whose weights it holds."""
    return {
        "LSTM": le.LSTM(4, seed=1, backend="numpy").build(3),
        "LSTM no bias": le.LSTM(2, use_bias=False, seed=2, backend="numpy").build(3),
        "LSTMCell": le.LSTMCell(3, seed=3, backend="numpy").build(2),
        "Bidirectional": le.Bidirectional(
            le.LSTM(3, return_sequences=True, seed=4, backend="numpy"),
            backward_layer=le.LSTM(2, return_sequences=True, go_backwards=True, seed=5, backend="numpy")).build(3),
        "Sequential": le.Sequential([
            le.Bidirectional(le.LSTM(3, return_sequences=True, seed=6, backend="numpy"), merge_mode="sum"),
            le.Dropout(0.25, seed=7), le.LSTM(2, return_sequences=True, seed=8, backend="numpy"),
            le.Dense(4, seed=9), le.Dense(1, use_bias=False, seed=10)]).build(3),
        "Sequential with Embedding": le.Sequential([
            le.Embedding(11, 5, mask_zero=True, seed=11),
            le.Bidirectional(le.LSTM(3, return_sequences=True, seed=12, backend="numpy")),
            le.LSTM(2, seed=13, backend="numpy"), le.Dense(3, seed=14)]).build(),
        "Sequential of one Embedding": le.Sequential([le.Embedding(7, 2, seed=15)]).build(),
    }


def saved_parts(model, tmp_path):
    """(header, {entry: array}) of ``model`` as le.save writes it."""
    path = tmp_path / "saved.npz"
    le.save(model, path, optimizer=le.optim.SGD(model, lr=0.1, momentum=0.9))
    with np.load(path, allow_pickle=False) as archive:
        return (json.loads(str(archive["__lstmeng__"])),
                {name: archive[name] for name in archive.files if name != "__lstmeng__"})


def write_parts(path, document, arrays):
    np.savez(path, __lstmeng__=np.array(json.dumps(document)), **arrays)


class RecordingOptimizer:
    def __init__(self):
        self.loaded = None

    def load_state_dict(self, state):
        self.loaded = state


@pytest.mark.parametrize("name", list(shape_check_models()))
def test_load_refuses_each_weight_of_the_wrong_shape(name, tmp_path):
    """Any one array of another shape than the config implies is refused, naming its entry, the
    expected and the actual shape; nothing is loaded (not even the optimizer's state)."""
    model = shape_check_models()[name]
    document, arrays = saved_parts(model, tmp_path)
    weights = model.get_weights()
    assert document["weights"] == len(weights) > 0
    keys = list(model.params)
    for index, weight in enumerate(weights):
        for bad_shape in (weight.shape[:-1] + (weight.shape[-1] + 1,),   # one column (or entry) more
                          (weight.shape[0] + 1,) + weight.shape[1:],     # one row more
                          weight.shape + (1,)):                           # one axis more
            changed = dict(arrays, **{f"weight_{index}": np.zeros(bad_shape, weight.dtype)})
            path = tmp_path / f"bad_{index}.npz"
            write_parts(path, document, changed)
            optimizer = RecordingOptimizer()
            with pytest.raises(ValueError) as info:
                le.load(path, optimizer=optimizer)
            message = str(info.value)
            assert str(path) in message and f"weight_{index} ({keys[index]})" in message, message
            assert f"must have shape {tuple(weight.shape)}" in message and f"got {bad_shape}" in message, message
            assert optimizer.loaded is None
    # The untouched file loads, with its optimizer state.
    path = tmp_path / "good.npz"
    write_parts(path, document, arrays)
    optimizer = RecordingOptimizer()
    loaded = le.load(path, optimizer=optimizer)
    assert optimizer.loaded is not None
    for actual, original in zip(loaded.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(actual, original)


def test_load_refuses_a_kernel_for_other_inputs_than_the_header_says(tmp_path):
    """Issue 13, item 10: header input_size 3, kernel of 4 rows: refused, not a layer for 4 inputs."""
    document, arrays = saved_parts(le.LSTM(2, seed=0, backend="numpy").build(3), tmp_path)
    path = tmp_path / "four_rows.npz"
    write_parts(path, document, dict(arrays, weight_0=np.zeros((4, 8), "float32")))
    with pytest.raises(ValueError, match=r"weight_0 \(kernel\) must have shape \(3, 8\) \(input_size=3, "
                                         r"units=2\), got \(4, 8\)"):
        le.load(path)
    # The same file with the header saying 4: a consistent file, a layer for 4 inputs.
    write_parts(path, dict(document, input_size=4), dict(arrays, weight_0=np.zeros((4, 8), "float32")))
    assert le.load(path).input_size == 4


@pytest.mark.parametrize("name", ["LSTM", "Sequential", "Sequential with Embedding"])
def test_load_refuses_a_header_input_size_the_weights_contradict(name, tmp_path):
    model = shape_check_models()[name]
    document, arrays = saved_parts(model, tmp_path)
    path = tmp_path / "header.npz"
    write_parts(path, dict(document, input_size=document["input_size"] + 1), arrays)
    with pytest.raises(ValueError, match="weights disagree with its .* config"):
        le.load(path)


@pytest.mark.parametrize("changes, expected", [
    ({"input_size": None}, "input_size is null"),
    ({"input_size": "3"}, "input_size must be a positive integer or null, got '3'"),
    ({"input_size": 0}, "input_size must be a positive integer or null, got 0"),
    ({"input_size": True}, "input_size must be a positive integer or null, got True"),
])
def test_load_refuses_bad_header_input_size(changes, expected, tmp_path):
    document, arrays = saved_parts(le.LSTM(2, seed=0, backend="numpy").build(3), tmp_path)
    path = tmp_path / "header.npz"
    write_parts(path, dict(document, **changes), arrays)
    with pytest.raises(ValueError, match=expected):
        le.load(path)


def test_load_refuses_missing_or_extra_weights(tmp_path):
    document, arrays = saved_parts(le.LSTM(2, seed=0, backend="numpy").build(3), tmp_path)
    path = tmp_path / "count.npz"
    write_parts(path, dict(document, weights=0), {})
    with pytest.raises(ValueError, match=r"input_size is 3, so the file must hold 3 weights \(kernel, "
                                         r"recurrent_kernel, bias\), but it holds none"):
        le.load(path)
    write_parts(path, dict(document, weights=2), {"weight_0": arrays["weight_0"], "weight_1": arrays["weight_1"]})
    with pytest.raises(ValueError, match=r"the config implies 3 weights .*, the file holds 2"):
        le.load(path)
    # A bias for a layer whose config says use_bias=False.
    document, arrays = saved_parts(le.LSTM(2, use_bias=False, seed=0, backend="numpy").build(3), tmp_path)
    write_parts(path, dict(document, weights=3), dict(arrays, weight_2=np.zeros(8, "float32")))
    with pytest.raises(ValueError, match=r"implies 2 weights \(kernel, recurrent_kernel\), the file holds 3"):
        le.load(path)


def test_load_refuses_embedding_output_size_the_next_layer_contradicts(tmp_path):
    model = shape_check_models()["Sequential with Embedding"]
    document, arrays = saved_parts(model, tmp_path)
    config = json.loads(json.dumps(document["config"]))
    config["layers"][0]["config"]["output_dim"] = 6   # the table and the next kernel are for 5
    path = tmp_path / "embedding.npz"
    write_parts(path, dict(document, config=config), arrays)
    with pytest.raises(ValueError, match="input_size is 5 but layers.1. follows an Embedding of output_dim 6"):
        le.load(path)
