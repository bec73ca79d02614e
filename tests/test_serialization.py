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
